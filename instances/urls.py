"""URLs of the instance and GPU pages (included at the site root, so names are global: `instance-detail`)."""
from django.urls import path

from . import views

urlpatterns = [
    path("dashboard/instances/", views.instance_rows, name="instance-rows"),
    # "new" is a reserved instance id, so this never hides an instance's page.
    path("instances/new/", views.instance_create, name="instance-create"),
    path("instances/new/own/", views.instance_create_own, name="instance-create-own"),
    path("instances/<slug:instance_id>/", views.instance_detail, name="instance-detail"),
    path("instances/<slug:instance_id>/live/", views.instance_live, name="instance-live"),
    path("instances/<slug:instance_id>/edit/", views.instance_edit, name="instance-edit"),
    path("instances/<slug:instance_id>/delete/", views.instance_delete, name="instance-delete"),
    path("instances/<slug:instance_id>/move/", views.instance_move, name="instance-move"),
    path("instances/<slug:instance_id>/build/", views.instance_build, name="instance-build"),
    path("instances/<slug:instance_id>/start/", views.instance_start, name="instance-start"),
    path("instances/<slug:instance_id>/stop/", views.instance_stop, name="instance-stop"),
    path("instances/<slug:instance_id>/restart/", views.instance_restart, name="instance-restart"),
    path("instances/<slug:instance_id>/shares/add/", views.share_add, name="instance-share-add"),
    path("instances/<slug:instance_id>/shares/<int:pk>/remove/", views.share_remove, name="instance-share-remove"),
    path("instances/<slug:instance_id>/logs/", views.instance_logs, name="instance-logs"),
    path("instances/<slug:instance_id>/logs/download/", views.instance_logs_download, name="instance-logs-download"),
    path("images/build/", views.image_build, name="image-build"),
    path("images/pull/", views.image_pull, name="image-pull"),
    path("gpus/", views.gpu_list, name="gpu-list"),
    path("gpus/discover/", views.gpu_discover, name="gpu-discover"),
    path("gpus/<int:pk>/shareable/", views.gpu_shareable, name="gpu-shareable"),
]

# An instance's workflows and custom nodes, the workflow library and templates (views_workflows.py).
from . import views_workflows  # noqa: E402

urlpatterns += [
    path("instances/<slug:instance_id>/workflows/", views_workflows.instance_workflows, name="instance-workflows"),
    path("instances/<slug:instance_id>/workflows/check/", views_workflows.workflows_check,
         name="instance-workflows-check"),
    path("instances/<slug:instance_id>/workflows/copy/", views_workflows.workflows_copy,
         name="instance-workflows-copy"),
    path("instances/<slug:instance_id>/workflows/publish/", views_workflows.workflow_publish,
         name="instance-workflow-publish"),
    path("instances/<slug:instance_id>/workflows/check-file/", views_workflows.workflow_check_file,
         name="instance-workflow-check-file"),
    path("instances/<slug:instance_id>/drift/", views_workflows.instance_drift, name="instance-drift"),
    path("instances/<slug:instance_id>/nodes/", views_workflows.instance_nodes, name="instance-nodes"),
    path("instances/<slug:instance_id>/nodes/install/", views_workflows.node_install, name="instance-node-install"),
    path("instances/<slug:instance_id>/nodes/action/", views_workflows.node_action, name="instance-node-action"),
    path("library/", views_workflows.library, name="library"),
    path("library/install/", views_workflows.library_install, name="library-install"),
    path("templates/", views_workflows.template_list, name="template-list"),
    # A template named "new" would be hidden by this page (template names are not checked against it).
    path("templates/new/", views_workflows.template_create, name="template-create"),
    path("templates/<slug:name>/", views_workflows.template_detail, name="template-detail"),
    path("templates/<slug:name>/new-instance/", views_workflows.template_new_instance, name="template-new-instance"),
    path("templates/<slug:name>/apply/", views_workflows.template_apply, name="template-apply"),
]

# Nodes: the GPU hosts instances run on (views_nodes.py); custom nodes are under instances/<id>/nodes/.
from . import views_nodes  # noqa: E402

urlpatterns += [
    path("nodes/", views_nodes.node_list, name="node-list"),
    path("nodes/<slug:name>/", views_nodes.node_detail, name="node-detail"),
    path("nodes/<slug:name>/approve/", views_nodes.node_approve, name="node-approve"),
    path("nodes/<slug:name>/revoke-approval/", views_nodes.node_revoke_approval, name="node-revoke-approval"),
]

# ComfyUI-Distributed clusters: a master instance and its workers (views_clusters.py).
from . import views_clusters  # noqa: E402

urlpatterns += [
    path("clusters/", views_clusters.cluster_list, name="cluster-list"),
    # A cluster named "new" would be hidden by this page.
    path("clusters/new/", views_clusters.cluster_create, name="cluster-create"),
    path("clusters/<slug:name>/", views_clusters.cluster_detail, name="cluster-detail"),
    path("clusters/<slug:name>/live/", views_clusters.cluster_live, name="cluster-live"),
    path("clusters/<slug:name>/start/", views_clusters.cluster_start, name="cluster-start"),
    path("clusters/<slug:name>/stop/", views_clusters.cluster_stop, name="cluster-stop"),
    path("clusters/<slug:name>/sync/", views_clusters.cluster_sync, name="cluster-sync"),
    path("clusters/<slug:name>/probe/", views_clusters.cluster_probe, name="cluster-probe"),
    path("clusters/<slug:name>/workers/add/", views_clusters.cluster_add_worker, name="cluster-add-worker"),
    path("clusters/<slug:name>/workers/remove/", views_clusters.cluster_remove_worker, name="cluster-remove-worker"),
    path("clusters/<slug:name>/delete/", views_clusters.cluster_delete, name="cluster-delete"),
]
