"""Reading torch.save files: one entry point, one error type naming the file, for the
checkpoint API and the weight loaders that use it (model.pretrained, zoo.style)."""

from __future__ import annotations

import os
import pickle
import re

import pytest
import torch

from functorch_diary.checkpoint import CheckpointError, load_torch_file
from functorch_diary.model.pretrained import load_state_dict_file
from functorch_diary.zoo.style import load_vgg19_features

LOADERS = {
    "load_torch_file": load_torch_file,
    "load_state_dict_file": load_state_dict_file,
    "load_vgg19_features": load_vgg19_features,
}


class _Evil:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_files(folder) -> dict[str, str]:
    """A garbage file, a truncated torch.save zip, a raw pickle that runs code, and a
    directory, by what they are."""
    files = {}
    garbage = folder / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all\n" * 20)
    files["garbage"] = str(garbage)
    whole = folder / "whole.pth"
    torch.save({"w": torch.ones(64)}, whole)
    truncated = folder / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[:300])
    files["truncated"] = str(truncated)
    evil = folder / "evil.pth"
    evil.write_bytes(pickle.dumps({"w": _Evil(folder / "pwned")}, protocol=2))
    files["code"] = str(evil)
    folder_as_file = folder / "a_directory.pth"
    folder_as_file.mkdir()
    files["directory"] = str(folder_as_file)
    return files


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_every_unreadable_file_is_one_checkpoint_error_naming_it(tmp_path, loader):
    for kind, path in _bad_files(tmp_path).items():
        if kind == "directory" and loader != "load_torch_file":
            continue  # the weight loaders say "no such file" first (FileNotFoundError)
        with pytest.raises(CheckpointError, match=re.escape(repr(path))):
            LOADERS[loader](path)
    assert not (tmp_path / "pwned").exists()


def test_a_file_of_something_else_than_a_state_dict_names_the_file(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.ones(1)], path)
    assert load_torch_file(path)[0].tolist() == [1.0]
    for loader in (load_state_dict_file, load_vgg19_features):
        with pytest.raises(CheckpointError, match=r"list\.pth.*does not hold a state_dict"):
            loader(path)


def test_mmap_reads_zip_files_and_legacy_files(tmp_path):
    torch.save({"w": torch.arange(3.0)}, tmp_path / "zip.pth")
    torch.save(
        {"w": torch.arange(3.0)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False
    )
    for name in ("zip.pth", "legacy.pth"):
        assert load_torch_file(tmp_path / name, mmap=True)["w"].tolist() == [0.0, 1.0, 2.0]
