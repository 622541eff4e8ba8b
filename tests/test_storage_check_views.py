"""The storage page: the check's findings, and the safe fixes applied from it."""
import pytest
from django.urls import reverse

from instances import services
from storage_app import layout

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def untidy(storage):
    """One instance never built, one with a missing folder, and a folder nobody registered."""
    services.instance_create(instance_id="unbuilt")
    services.instance_create(instance_id="half")
    layout.build_shared_tree()
    layout.build_instance_tree("half")
    (storage["instances"] / "half" / "temp").rmdir()
    (storage["instances"] / "stray").mkdir()
    (storage["instances"] / "stray" / "keep.txt").write_text("keep")
    return storage


def rows(text):
    table = text.split('id="storage-findings"')[1].split("</table>")[0]
    return {row.split('"', 1)[0]: row for row in table.split('data-code="')[1:]}


def test_a_consistent_install_says_no_findings(client, stranger, storage):
    services.instance_create(instance_id="tidy")
    layout.build_shared_tree()
    layout.build_instance_tree("tidy")
    client.force_login(stranger)
    text = client.get("/storage/").content.decode()
    assert 'id="storage-clean"' in text and "No findings" in text
    assert 'id="storage-findings"' not in text


def test_the_page_lists_each_finding_with_its_fix_and_whether_it_is_safe(client, operator, untidy):
    client.force_login(operator)
    text = client.get("/storage/").content.decode()
    found = rows(text)
    assert set(found) == {"missing-directory", "missing-folders", "orphan-directory"}
    assert "unbuilt" in found["missing-directory"] and "does not exist." in found["missing-directory"]
    assert "Build the instance&#x27;s directories (safe)." in found["missing-directory"]
    assert "lacks temp" in found["missing-folders"] and ">yes<" in found["missing-folders"]
    assert "stray" in found["orphan-directory"] and ">no<" in found["orphan-directory"]
    assert "has no instance in the registry" in found["orphan-directory"]
    assert "Apply safe fixes (2)" in text


def test_a_stranger_sees_the_findings_but_may_not_fix_them(client, stranger, untidy):
    client.force_login(stranger)
    text = client.get("/storage/").content.decode()
    assert "missing-directory" in text and "Apply safe fixes" not in text
    assert client.post(reverse("storage-fix")).status_code == 403
    assert not (untidy["instances"] / "unbuilt").exists()
    assert not (untidy["instances"] / "half" / "temp").exists()


def test_an_operator_applies_the_safe_fixes_and_sees_what_was_fixed(client, operator, untidy):
    client.force_login(operator)
    response = client.post(reverse("storage-fix"), follow=True)
    assert response.redirect_chain == [("/storage/", 302)]
    text = response.content.decode()
    assert "Fixed 2: missing-folders (half): Create them; missing-directory (unbuilt): Build the instance&#x27;s " \
           "directories." in text
    assert (untidy["instances"] / "unbuilt" / "user").is_dir() and (untidy["instances"] / "half" / "temp").is_dir()
    assert set(rows(text)) == {"orphan-directory"}  # needs a person: never touched
    assert (untidy["instances"] / "stray" / "keep.txt").read_text() == "keep"
    assert "Apply safe fixes" not in text


def test_applying_fixes_when_none_is_safe_says_so(client, operator, storage):
    (storage["instances"] / "stray").mkdir(parents=True)
    client.force_login(operator)
    response = client.post(reverse("storage-fix"), follow=True)
    assert "Nothing needed a safe fix; what remains needs a person." in response.content.decode()
    assert (storage["instances"] / "stray").is_dir()
