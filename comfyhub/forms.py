"""Forms of the core, and what every page does with a service's refusal: a ValidationError({field: [message]}) goes
next to the form's fields it names (the rest above the form), or into a message on a page without a form; a job queue
that does not answer goes into a message."""
from contextlib import contextmanager

from django import forms
from django.contrib import messages
from django.core.exceptions import ValidationError

from . import tokens
from .models import Operation
from .operations import kind_choices
from .queues import QueueUnavailable


def add_service_error(form: forms.BaseForm, exc: ValidationError):
    """Put a service's ValidationError({field: [message]}) next to the fields it names; the rest above the form."""
    errors = exc.error_dict if hasattr(exc, "error_dict") else {None: exc.error_list}
    for field, messages_ in errors.items():
        form.add_error(field if field in form.fields else None, messages_)


class ServiceForm(forms.Form):
    """A form whose data goes to a service, which has the last word: its refusal is shown on the form."""

    def add_service_error(self, exc: ValidationError):
        add_service_error(self, exc)


@contextmanager
def service_errors(request, form: ServiceForm | None = None, *, prefix: str = ""):
    """Run a view's call of one service (and what it does when the service succeeds: a message, a redirect) so a
    refusal is shown instead of raised: on `form`, or as an error message (after `prefix`) without one. The view
    goes on after the `with` block: it shows its page again, or redirects."""
    try:
        yield
    except ValidationError as exc:
        if form is not None:
            form.add_service_error(exc)
        else:
            messages.error(request, prefix + " ".join(exc.messages))
    except QueueUnavailable as exc:
        messages.error(request, prefix + str(exc))


class OperationFilterForm(forms.Form):
    status = forms.ChoiceField(required=False, choices=[("", "Any status"), *Operation.Status.choices])
    kind = forms.ChoiceField(required=False)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["kind"].choices = [("", "Any kind"), *kind_choices()]

    def filter(self, queryset):
        if not self.is_valid():
            return queryset
        if self.cleaned_data["status"]:
            queryset = queryset.filter(status=self.cleaned_data["status"])
        if self.cleaned_data["kind"]:
            queryset = queryset.filter(kind=self.cleaned_data["kind"])
        return queryset


class AccessTokenForm(ServiceForm):
    """A new personal access token: what it is for, when it runs out (comfyhub/tokens.py has the rules), and the
    user's password again. A page of an instance runs on the hub's origin and can post this form with the user's
    session and CSRF token; it does not know the password, so it cannot make itself a token that outlives the tab."""

    name = forms.CharField(max_length=100, help_text="What it is for, e.g. 'render farm script'.")
    expires = forms.CharField(label="Expires after", required=False, initial="90",
                              help_text=tokens.EXPIRY_HELP)
    password = forms.CharField(label="Your password", strip=False,
                               widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}),
                               help_text="Making a token asks for your ComfyHub password again.")

    def __init__(self, *args, user, **kwargs):
        super().__init__(*args, **kwargs)
        self.user = user

    def clean_expires(self):
        try:
            return tokens.parse_expiry(self.cleaned_data["expires"])
        except ValidationError as exc:
            raise ValidationError(exc.message_dict["expires"]) from exc

    def clean_password(self):
        password = self.cleaned_data["password"]
        if not self.user.check_password(password):
            raise ValidationError("That is not your password. Type the password you log in to ComfyHub with.")
        return password
