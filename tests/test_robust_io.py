"""load refuses every malformed file with a named ValueError; save follows a symlink.

No silent wrong answers: one test (or parametrized family) per finding of the hostile-input pass
of version 0.2 (numbered as there).
"""

import contextlib
import os
import re
import time

import pytest
import torch
from robustness_helpers import NAN, _hs

from torchdyn_hypersolvers import (
    Trajectories,
    load,
    save,
)

# --- 8. load validates the tableau and the weights -----------------------------------------------------


def _saved(tmp_path):
    hs = _hs()
    trajectories = Trajectories(torch.linspace(0, 1, 5), torch.randn(5, 4, 2), {4: torch.arange(5)})
    path = tmp_path / "hs.pt"
    save(hs, path, trajectories=trajectories)
    return hs, path


def _tampered(tmp_path, mutate):
    _, path = _saved(tmp_path)
    blob = torch.load(path, weights_only=True)
    mutate(blob)
    torch.save(blob, path)
    return path


def _nan_weight(blob):
    key = sorted(k for k, v in blob["state_dict"].items() if v.is_floating_point())[0]
    blob["state_dict"][key].view(-1)[0] = NAN


TAMPERED_TABLEAU = {
    "nan-weights": (_nan_weight, r"(?i)nan|non-finite|not finite"),
    "order-minus-5": (lambda blob: blob["tableau"].update(order=-5), r"-5"),
    "b-not-summing-to-1": (lambda blob: blob["tableau"].update(b=[0.5]), r"(?i)sum|0\.5"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED_TABLEAU))
def test_08_load_refuses_nan_weights_and_inconsistent_tableaus(tmp_path, case):
    mutate, match = TAMPERED_TABLEAU[case]
    path = _tampered(tmp_path, mutate)
    with pytest.raises(ValueError, match=match):
        load(path)


# --- 13. save follows a symlink ----------------------------------------------------------------------


def test_13_save_onto_a_symlink_follows_it(tmp_path):
    target_dir = tmp_path / "store"
    target_dir.mkdir()
    target = target_dir / "g.pt"
    target.write_bytes(b"an older file")
    link = tmp_path / "current.pt"
    try:
        link.symlink_to(target)
    except (OSError, NotImplementedError):
        pytest.skip("symlinks are not supported here")
    hs = _hs()
    save(hs, link)
    assert link.is_symlink(), "save replaced the symlink by a file"
    assert os.readlink(link) == str(target)
    assert target.read_bytes() != b"an older file", "the link's target did not get the new content"
    for path in (link, target):
        loaded = load(path)
        assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), hs.parameters()))
    leftovers = [p.name for d in (tmp_path, target_dir) for p in d.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers


# --- 15. load: every malformed file is a named ValueError ----------------------------------------------


def test_15_load_truncated_file_is_a_value_error(tmp_path):
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    n = len(data)
    wrong = {}
    for cut in sorted({0, 1, n // 4, n // 2, n - 64, n - 21, n - 20, n - 10, n - 1}):
        truncated = tmp_path / f"cut{cut}.pt"
        truncated.write_bytes(data[:cut])
        try:
            load(truncated)
            wrong[cut] = "loaded"
        except ValueError:
            pass
        except Exception as err:
            wrong[cut] = type(err).__name__
    assert not wrong, f"truncated files (cut point: outcome) not refused with ValueError: {wrong}"


def test_15_load_text_file_is_a_value_error_naming_it(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello world\n")
    with pytest.raises(ValueError, match=re.escape(text.name)):
        load(text)


def _set(*keys, value):
    def mutate(blob):
        record = blob
        for key in keys[:-1]:
            record = record[key]
        record[keys[-1]] = value

    return mutate


def _delete(*keys):
    def mutate(blob):
        record = blob
        for key in keys[:-1]:
            record = record[key]
        del record[keys[-1]]

    return mutate


ILL_FORMED = {
    "tableau-missing-b": (_delete("tableau", "b"), r"(?i)tableau"),
    "tableau-a-not-a-list": (_set("tableau", "a", value=5), r"(?i)tableau"),
    "tableau-order-not-an-int": (_set("tableau", "order", value="four"), r"(?i)order"),
    "tableau-not-a-dict": (_set("tableau", value="rk4"), r"(?i)tableau"),
    "hypernet-missing-class": (_delete("hypernet", "class"), r"(?i)hypernet|class"),
    "hypernet-config-not-a-dict": (_set("hypernet", "config", value="hidden"), r"(?i)hypernet|config"),
    "hypernet-config-bad-value": (_set("hypernet", "config", "state_dim", value="two"), r"(?i)state_dim|config"),
    "solver-not-a-str": (_set("solver", value=7), r"(?i)solver"),
    "validity-missing-fields": (_set("validity", value={"dt_min": 0.25}), r"(?i)validity|dt_max|state_shape"),
    "validity-state-shape-ill-typed": (_set("validity", "state_shape", value="two"), r"(?i)validity|state_shape"),
    "validity-dt-ill-typed": (_set("validity", "dt_min", value="small"), r"(?i)validity|dt_min"),
}


@pytest.mark.parametrize("case", sorted(ILL_FORMED))
def test_15_load_missing_or_ill_typed_fields_are_value_errors(tmp_path, case):
    mutate, match = ILL_FORMED[case]
    path = _tampered(tmp_path, mutate)
    with pytest.raises(ValueError, match=match):
        load(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_15_load_to_cuda_on_a_cpu_only_machine_does_not_call_the_file_corrupt(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(Exception) as info:  # noqa: B017 -- any error, as long as it says what is wrong
        load(path, map_location="cuda")
    message = str(info.value)
    assert "corrupt" not in message.lower(), message
    assert "cuda" in message.lower(), message


@contextlib.contextmanager
def _address_space_limit(extra_bytes):
    """Cap this process's address space at its current size plus ``extra_bytes`` (Linux)."""
    resource = pytest.importorskip("resource")
    try:
        with open("/proc/self/status") as handle:
            size = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        pytest.skip("needs /proc/self/status")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + extra_bytes if hard == resource.RLIM_INFINITY else min(size + extra_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_15_load_checks_the_config_against_the_weights_before_building(tmp_path):
    # a few-KB file whose config asks for two 2**17-wide layers (64 GiB of weights)
    path = _tampered(tmp_path, _set("hypernet", "config", "hidden", value=[2**17, 2**17]))
    assert path.stat().st_size < 64 * 1024
    start = time.perf_counter()
    with _address_space_limit(2 << 30), pytest.raises(ValueError, match=r"(?i)parameter|shape") as info:
        load(path)
    assert time.perf_counter() - start < 3, "load spent seconds before refusing the file"
    assert re.search(r"131072|parameter", str(info.value)), str(info.value)
