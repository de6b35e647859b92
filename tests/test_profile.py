"""The tinyfs BagIt profile (docs/profile/tinyfs-bagit-profile.json): instance bags and exports of every
form conform to it as bagit_profile checks, and a bag that names it but breaks it is found out by
`ingest --bag` and fsck."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import bagit
import bagit_profile
import pytest
from conftest import PUBLISHED_PROFILE, check_archive_ok, check_profile, run_tinyfs, tinyfs_profile

from tinyfs import Archive
from tinyfs.core import bagwrite, profile
from tinyfs.core.errors import InvalidBag
from tinyfs.core.export import export, stream
from tinyfs.core.fsck import fsck
from tinyfs.core.ingest import ingest_bag

pytestmark = pytest.mark.core


@pytest.fixture
def archive(tmp_path) -> Archive:
    """sha256 first, then md5: a profile that required sha512 would refuse these bags."""
    archive = Archive.init(tmp_path / "archive", digests=["sha256", "md5"])
    with archive.new("r", message="first\nof two", creator="Ada", label="v1") as txn:
        txn.add_bytes("a.txt", b"a\n")
        txn.add_bytes("d/b.txt", b"b\n")
    with archive.get("r", "a") as txn:
        txn.add_bytes("a.txt", b"a2\n")
    return archive


def test_the_published_profile_is_the_one_tinyfs_checks():
    assert json.loads(PUBLISHED_PROFILE.read_text()) == profile.PROFILE
    assert profile.PROFILE["BagIt-Profile-Info"]["BagIt-Profile-Identifier"] == bagwrite.PROFILE
    assert tinyfs_profile().profile_version_info == (1, 4, 0)   # bagit_profile accepted the document


def test_instances_conform(archive):
    check_archive_ok(archive.root.root)     # bagit validation, the profile, and fsck, for every instance


def test_every_export_form_conforms(archive, tmp_path):
    export(archive.root, "r", tmp_path / "dir", instance="v1")
    check_profile(bagit.Bag(str(tmp_path / "dir")))

    buffer = io.BytesIO()
    stream(archive.root, "r", buffer, form="zip", top="bag")
    (tmp_path / "bag.zip").write_bytes(buffer.getvalue())
    with zipfile.ZipFile(tmp_path / "bag.zip") as zf:
        zf.extractall(tmp_path / "unzipped")
    unzipped = bagit.Bag(str(tmp_path / "unzipped" / "bag"))
    unzipped.validate()
    check_profile(unzipped, serialized=tmp_path / "bag.zip")


def test_a_serialized_bag_of_another_kind_does_not_conform(archive, tmp_path):
    export(archive.root, "r", tmp_path / "dir")
    (tmp_path / "bag.rar").write_bytes(b"not a tar")
    with pytest.raises(bagit_profile.ProfileValidationError):
        tinyfs_profile().validate_serialization(str(tmp_path / "bag.rar"))


def _rewrite_tag_manifests(bag: Path) -> None:
    """Make an edited bag valid again (every tag manifest recomputed): only the profile is broken."""
    for manifest in bag.glob("tagmanifest-*.txt"):
        alg = manifest.name[len("tagmanifest-"):-len(".txt")]
        names = sorted(p.name for p in bag.iterdir() if p.is_file() and not p.name.startswith("tagmanifest-"))
        manifest.write_text("".join(f"{hashlib.new(alg, (bag / n).read_bytes()).hexdigest()}  {n}\n"
                                    for n in names))


def _without_bag_info(bag: Path, element: str) -> None:
    info = bag / "bag-info.txt"
    info.write_text("".join(line for line in info.read_text().splitlines(True) if not line.startswith(element)))
    _rewrite_tag_manifests(bag)


def _refusal(archive, bag: Path) -> list[str]:
    """The problems `ingest --bag` lists for `bag`, after checking that bagit_profile refuses it too."""
    plain = bagit.Bag(str(bag))
    plain.validate()                                  # a valid bag: only the profile is broken
    assert not tinyfs_profile().validate(plain)
    with pytest.raises(InvalidBag) as refused:
        ingest_bag(archive, "again", bag)
    assert "again" not in archive
    return [str(p) for p in refused.value.problems]


def test_an_export_without_its_instance_json_is_refused(archive, tmp_path):
    bag = tmp_path / "bag"
    export(archive.root, "r", bag)
    (bag / "instance.json").unlink()
    _rewrite_tag_manifests(bag)
    assert _refusal(archive, bag) == ["instance.json: tinyfs BagIt profile: missing: the profile requires "
                                      "this tag file"]


def test_an_export_missing_a_required_element_or_with_a_stray_tag_file_is_refused(archive, tmp_path):
    bag = tmp_path / "bag"
    export(archive.root, "r", bag)
    _without_bag_info(bag, "External-Identifier")
    (bag / "notes.txt").write_text("added by hand\n")
    _rewrite_tag_manifests(bag)
    assert _refusal(archive, bag) == [
        "bag-info.txt: tinyfs BagIt profile: lacks External-Identifier, which the profile requires",
        "notes.txt: tinyfs BagIt profile: a tag file the profile does not allow"]


def test_the_command_line_says_so_and_commits_nothing(archive, tmp_path):
    bag = tmp_path / "bag"
    export(archive.root, "r", bag)
    _without_bag_info(bag, "Payload-Oxum")
    r = run_tinyfs("ingest", archive.root.root, "again", "--bag", bag, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [
        f"tinyfs: invalid bag {bag}: 1 problem",
        "  bag-info.txt: tinyfs BagIt profile: lacks Payload-Oxum, which the profile requires [profile-violation]"]
    assert run_tinyfs("ls", archive.root.root).stdout.split() == ["r"]


def test_a_bag_naming_no_profile_is_ingested_as_before(archive, tmp_path):
    bag = tmp_path / "bag"
    export(archive.root, "r", bag)
    _without_bag_info(bag, "BagIt-Profile-Identifier")
    (bag / "instance.json").unlink()
    _rewrite_tag_manifests(bag)
    assert ingest_bag(archive, "plain", bag).instance is not None
    assert sorted(archive.root.instance("plain", archive.root.head("plain")).state.files) == ["a.txt", "d/b.txt"]


def test_fsck_reports_an_instance_whose_bag_info_breaks_the_profile(archive):
    root = archive.root
    iid = root.head("r")
    _without_bag_info(root.instance_dir("r", iid), "Tinyfs-Instance")
    bagit.Bag(str(root.instance_dir("r", iid))).validate()
    findings = [(f.instance, f.path, f.code, f.message) for f in fsck(root).findings]
    assert findings == [(iid, "bag-info.txt", "bad-bag-info",
                         "tinyfs BagIt profile: lacks Tinyfs-Instance, which the profile requires")]
