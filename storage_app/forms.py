from django import forms

from .models import ModelAsset


class ModelFilterForm(forms.Form):
    q = forms.CharField(required=False, label="Search", widget=forms.TextInput(attrs={"placeholder": "name or hash"}))
    folder = forms.ChoiceField(required=False)
    status = forms.ChoiceField(required=False, choices=[("", "Any status"), *ModelAsset.Status.choices])

    def __init__(self, *args, folders=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["folder"].choices = [("", "All folders"), *[(f, f) for f in folders]]

    def filter(self, queryset):
        if not self.is_valid():
            return queryset
        data = self.cleaned_data
        if data["folder"]:
            queryset = queryset.filter(folder=data["folder"])
        if data["status"]:
            queryset = queryset.filter(status=data["status"])
        if data["q"]:
            term = data["q"].strip()
            queryset = queryset.filter(path__icontains=term) | queryset.filter(sha256__startswith=term.lower())
        return queryset


class ImportHashesForm(forms.Form):
    file = forms.FileField(help_text="sha256sum format: '<sha256>  <path relative to shared/models>' per line.")
