"""``advgen generate`` end to end: layout, manifests against independent checks, rounding,
determinism, resume after SIGKILL, two-process torchrun, and refusals before compute."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from typer.testing import CliRunner

from conftest import WRITERS, small_spec
from advgen.data.clean import write_clean
from advgen.data.datasets import load_source, locate
from advgen import attacks
from advgen.generation.driver import _finish
from advgen.storage.shards import decode_png, file_digest, iter_tar
from advgen.victims.train import Recipe, train_victim
from advgen.storage.variants import Variant, summarize
from advgen.victims import load, save
from advgen.stages.cli import app

runner = CliRunner()
METHODS = "fgsm,d_fgsm,fgm_l2,illc_fast,pgd,deepfool"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    for name in ("mnist", "cifar10"):
        spec = small_spec(name, train=40, test=24)
        WRITERS[name](root / name / "raw", spec)
        write_clean(load_source(spec, locate(spec, [root / name / "raw"]), allow_unverified=True),
                    root / name / "clean", shard_size=8)
    from advgen.data.clean import load_clean_split, open_clean

    clean = root / "mnist" / "clean"
    stats = open_clean(clean)
    x, y, _ = load_clean_split(clean, stats, "train")
    for seed in (0, 1):
        model, _ = train_victim("mlp", dataset="mnist", num_classes=10, x=x, y=y,
                                recipe=Recipe(epochs=3, batch_size=8, lr=0.02), seed=seed,
                                device=torch.device("cpu"), crop_pad=0, flip=False)
        model.meta.test_accuracy = 1.0
        save(model, root / f"mlp{seed}.pt")
    return root


def _args(setup: Path, out: Path, *extra: str, ckpt: str = "mlp0.pt") -> list[str]:
    return ["generate", "--victim-ckpt", str(setup / ckpt), "--clean", str(setup / "mnist" / "clean"),
            "--out", str(out), "--method", METHODS, "--eps", "0.1", "--eps", "0.3", "--steps", "3",
            "--max-iter", "10", "--device", "cpu", "--batch-size", "5", *extra]


@pytest.fixture(scope="module")
def reference(setup):
    out = setup / "ref"
    result = runner.invoke(app, _args(setup, out, "--store-float", "--workers", "1"))
    assert result.exit_code == 0, result.output
    return out


def test_layout_keys_and_labels_follow_the_clean_shards(setup, reference):
    clean = setup / "mnist" / "clean"
    clean_stats = json.loads((clean / "_stats.json").read_text())
    folders = sorted(str(p.parent.relative_to(reference)) for p in reference.rglob("_stats.json"))
    expected = sorted([f"{m}/eps={e}" for m in METHODS.split(",") if m != "deepfool" for e in ("0.1", "0.3")]
                      + ["deepfool"])
    assert folders == expected
    for folder in folders:
        stats = json.loads((reference / folder / "_stats.json").read_text())
        assert stats["shards"] == clean_stats["shards"] and stats["counts"] == {"train": 40, "test": 24}
        for name in clean_stats["shards"]["test"]:
            clean_samples = dict(iter_tar(clean / name))
            adv_samples = dict(iter_tar(reference / folder / name))
            assert list(adv_samples) == list(clean_samples)
            assert all(adv_samples[k]["cls"] == clean_samples[k]["cls"] for k in clean_samples)
        for name, digest in stats["sha256"].items():
            assert file_digest(reference / folder / name) == digest
        assert f"| `{name}` | `{digest}` |" in (reference / folder / "README.md").read_text()


def test_manifests_agree_with_an_independent_look_at_the_stored_images(setup, reference):
    model = load(setup / "mlp0.pt", dataset="mnist")
    clean = setup / "mnist" / "clean"
    for folder in ("fgsm/eps=0.1", "d_fgsm/eps=0.3", "pgd/eps=0.1", "deepfool"):
        for name in ("train-000000.tar", "test-000002.tar"):
            table = pq.read_table(reference / folder / name.replace(".tar", ".parquet")).to_pydict()
            clean_samples = dict(iter_tar(clean / name))
            for i, (key, members) in enumerate(iter_tar(reference / folder / name)):
                png = decode_png(members["png"]).astype(np.float64) / 255
                flt = np.load(io.BytesIO(members["npy"]), allow_pickle=False)
                assert flt.dtype == np.float32
                x0 = decode_png(clean_samples[key]["png"]).astype(np.float64) / 255
                # The PNG is the float image rounded to nearest (never truncated), except where nearest
                # would leave the L∞ ball: there it is rounded towards the clean pixel.
                want = np.rint(flt.transpose(1, 2, 0) * np.float32(255)).astype(np.float64)  # float32, as stored
                if folder.startswith(("fgsm", "d_fgsm", "pgd")):
                    k = np.floor(float(folder.split("=")[1]) * 255 + 1e-6)
                    want = np.clip(want, np.rint(x0 * 255) - k, np.rint(x0 * 255) + k)
                finished = table.get("lattice_steps", [0] * (i + 1))[i] > 0
                if not finished:
                    np.testing.assert_array_equal(want, np.rint(png * 255))
                else:  # rounding-aware: the float result reached the goal, rounding undid it, lattice steps redid it
                    assert table["float_pred"][i] != int(members["cls"]) and table["success"][i]
                assert table["key"][i] == key
                assert table["linf"][i] == pytest.approx(np.abs(png - x0).max(), abs=1e-6)
                assert table["l2"][i] == pytest.approx(np.sqrt(((png - x0) ** 2).sum()), rel=1e-5)
                with torch.no_grad():
                    logits = model(torch.from_numpy(png.transpose(2, 0, 1)[None]).float())
                assert table["adv_pred"][i] == int(logits.argmax())
                label = int(members["cls"])
                coop = folder.startswith("d_")
                assert table["success"][i] == ((table["adv_pred"][i] == label) if coop else (table["adv_pred"][i] != label))
                if folder.startswith(("fgsm", "d_fgsm", "pgd")):
                    assert np.abs(png - x0).max() <= float(folder.split("=")[1]) + 1e-9  # the ball holds as stored


def test_single_step_success_grows_with_eps_and_cooperation_helps(reference):
    def stat(folder):
        return json.loads((reference / folder / "_stats.json").read_text())["splits"]["test"]

    assert stat("fgsm/eps=0.3")["accuracy"] <= stat("fgsm/eps=0.1")["accuracy"] <= stat("fgsm/eps=0.1")["clean_accuracy"]
    assert stat("d_fgsm/eps=0.1")["accuracy"] >= stat("d_fgsm/eps=0.1")["clean_accuracy"]
    df = stat("deepfool")
    assert "mean_iterations" in df and 0 <= df["converged_rate"] <= 1


def test_webdataset_reads_a_variant(reference):
    url = str(reference / "fgsm" / "eps=0.1" / "test-{000000..000002}.tar")
    samples = list(wds.WebDataset(url, shardshuffle=False).decode("l8").to_tuple("__key__", "png", "cls"))
    assert [k for k, _, _ in samples] == [f"{i:06d}" for i in range(24)]
    assert samples[0][1].shape == (28, 28)


def test_same_inputs_same_bytes_and_rerun_skips(setup, reference, tmp_path):
    out = tmp_path / "again"
    assert runner.invoke(app, _args(setup, out, "--store-float", "--workers", "0")).exit_code == 0
    assert _tree(out) == _tree(reference)
    rerun = runner.invoke(app, _args(setup, out, "--store-float"))
    assert "0 shard(s) computed" in rerun.stderr and _tree(out) == _tree(reference)


def test_changed_victim_or_eps_never_reuses(setup, reference, tmp_path):
    out = tmp_path / "o"
    assert runner.invoke(app, _args(setup, out, "--store-float")).exit_code == 0
    other = runner.invoke(app, _args(setup, out, "--store-float", ckpt="mlp1.pt"))
    assert other.exit_code == 0 and ", 0 already done" in other.stderr
    assert (out / "fgsm/eps=0.1/_stats.json").read_bytes() != (reference / "fgsm/eps=0.1/_stats.json").read_bytes()
    # A changed step count invalidates pgd (the only method here that has steps) and nothing else:
    # 2 ε × 8 shards recomputed, the other 9 variants × 8 shards reused.
    steps = runner.invoke(app, _args(setup, out, "--store-float", "--steps", "4", ckpt="mlp1.pt"))
    assert steps.exit_code == 0
    assert "16 shard(s) computed, 72 already done" in steps.stderr


def test_resume_after_sigkill_gives_identical_bytes(setup, reference, tmp_path, cli_env):
    out = tmp_path / "killed"
    cmd = ["advgen", *_args(setup, out, "--store-float", "--workers", "0")]
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.rglob("*.parquet"))[:3]:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list(out.rglob("*.parquet"))
    assert done, "the run was killed before it wrote anything"
    assert not list(out.rglob("_stats.json")), "the run finished before it was killed"
    rerun = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    skipped = int(rerun.stderr.split(" already done")[0].split()[-1])
    assert skipped >= 1
    assert _tree(out) == _tree(reference)


def test_two_process_torchrun_equals_one_process(setup, reference, tmp_path, cli_env):
    out = tmp_path / "ddp"
    env = {**cli_env, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "advgen",
                           *_args(setup, out, "--store-float", "--workers", "0")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 1/2" in proc.stderr
    assert _tree(out) == _tree(reference)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_with_a_rendezvous_equal_one_process(setup, reference, tmp_path, cli_env):
    """The README's multi-node command, as run: two torchrun launchers (one per "node", here on one machine)
    meet at a c10d rendezvous endpoint and write into one shared output folder."""
    out = tmp_path / "nodes"
    port = _free_port()
    env = {**cli_env, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = ["torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "advgen-test", "-m", "advgen",
           *_args(setup, out, "--store-float", "--workers", "0")]
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [n.communicate(timeout=600)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(logs)
    assert any("rank 1/2" in log for log in logs) and any("rank 0/2" in log for log in logs)
    assert _tree(out) == _tree(reference)


@pytest.mark.parametrize("change, message", [
    (["--method", "cw"], "unknown method 'cw'"),
    (["--eps", "-0.1"], "must lie in [0, 1] (pixel units)"),
    (["--eps", "1.5"], "must lie in [0, 1] (pixel units)"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--label-source", "oracle"], "--label-source must be true or predicted"),
])
def test_bad_parameters_fail_before_compute(setup, tmp_path, change, message):
    out = tmp_path / "bad"
    result = runner.invoke(app, _args(setup, out) + change)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_wrong_dataset_and_missing_clean_fail_before_compute(setup, tmp_path):
    out = tmp_path / "bad"
    args = _args(setup, out)
    wrong = args.copy()
    wrong[wrong.index("--clean") + 1] = str(setup / "cifar10" / "clean")
    result = runner.invoke(app, wrong)
    assert result.exit_code == 2 and "trained on mnist, but the data here is cifar10" in result.stderr
    missing = args.copy()
    missing[missing.index("--clean") + 1] = str(tmp_path / "nowhere")
    result = runner.invoke(app, missing)
    assert result.exit_code == 2 and "no such folder" in result.stderr
    assert not out.exists()


class _Threshold(torch.nn.Module):
    """Class 1 when the mean pixel exceeds ``t``, else class 0, with a steep margin."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t

    def forward(self, x):
        s = (x.flatten(1).mean(1) - self.t) * 1e4
        return torch.stack([torch.zeros_like(s), s], dim=1)


def test_rounding_keeps_0_6_drops_0_4_and_counts_changed_outcomes():
    x0 = torch.full((2, 1, 2, 2), 100 / 255)
    model = _Threshold(t=100.2 / 255).eval()
    y = torch.zeros(2, dtype=torch.int64)
    with torch.no_grad():
        b = attacks.Context(model, x0, y, y, model(x0), attacks.Params(), seeds=[0, 0], eps=1.0)
    x_adv = x0 + torch.tensor([0.6, 0.4]).view(2, 1, 1, 1) / 255
    cols = _finish(model, b, x_adv, Variant("fgm", 1.0), audit=True, extra={})  # unbounded: plain nearest rounding
    assert cols["stored"][:, 0, 0, 0].tolist() == [101, 100]  # 0.6/255 survives as 1/255, 0.4/255 vanishes
    assert cols["float_pred"].tolist() == [1, 1]  # both float images cross the threshold
    assert cols["adv_pred"].tolist() == [1, 0]  # only the first survives rounding
    assert cols["rounding_changed"].tolist() == [False, True]
    import pyarrow as pa

    table = pa.table({k: v.numpy() for k, v in cols.items() if k not in ("stored", "float")} | {"label": y.numpy()})
    assert summarize(table)["rounding_changed"] == 1


def test_loading_helpers_give_the_stored_images(reference):
    from torch.utils.data import DataLoader

    from advgen.storage.loading import ShardDataset, iter_batches

    folder = reference / "fgsm" / "eps=0.1"
    batches = list(iter_batches(folder, "test", batch_size=10))
    assert [len(y) for _, y in batches] == [10, 10, 4]
    x = torch.cat([b for b, _ in batches])
    assert x.shape == (24, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    first = next(iter_tar(folder / "test-000000.tar"))[1]
    assert torch.equal(x[0, 0], torch.from_numpy(decode_png(first["png"])[..., 0]).float() / 255)
    loaded = list(DataLoader(ShardDataset(folder, "test"), batch_size=8, num_workers=2))
    assert sum(len(y) for _, y in loaded) == 24
    assert sorted(torch.cat([y for _, y in loaded]).tolist()) == sorted(torch.cat([y for _, y in batches]).tolist())
