"""What the signed-in person may do with an instance, for pages that list many (instances/access.py decides)."""
from django import template

from instances import access

register = template.Library()


@register.simple_tag(takes_context=True)
def may_operate(context, instance):
    """Start, stop and restart: operators, and owners who may run their own instances."""
    request = context.get("request")
    return bool(request) and access.can_operate(request.user, instance)
