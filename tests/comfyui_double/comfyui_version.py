# The test double's version, where ComfyUI keeps its own (comfyui_version.py in its checkout): the image build reads
# it into /etc/comfyhub/image.json. Keep it equal to COMFYUI_VERSION in server.py.
__version__ = "0.0.0-testdouble"
