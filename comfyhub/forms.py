from django import forms

from .models import Operation
from .operations import kind_choices


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
