"""Long runs survive the real world: a stop at any point resumes to the same weights, bit for
bit (float64); SIGTERM in real processes and under torchrun; images that fail to read mid-run
stop the run naming them or are skipped and listed; `check-data` finds them first; a failed
checkpoint write leaves the previous checkpoint loadable."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import tifffile
import torch

from executor import atomic_write, load_plan
from tests.tileplan.run.tiny_runs import StopAt, run_cli, tiny_float64_run
from tileplan.planning.model_file import load_model_file
from tileplan.run import trainer as trainer_module
from tileplan.run.check_data import check_data
from tileplan.run.checkpoint import load_checkpoint
from tileplan.run.data import ImageReadError, load_csv
from tileplan.run.interrupts import (
    DUPLICATE_WINDOW_S,
    EXIT_INTERRUPTED,
    RunInterruptedError,
)
from tileplan.run.launch import check_space
from tileplan.run.policy import Cadence, RunPolicy
from tileplan.run.report import load_metrics
from tileplan.run.trainer import Trainer, TrainError
from tileplan.settings import DataSettings, RunSpec

SIZE = 96  # px: two by two tiles of 64 px for the tiny model
EPOCHS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, 8 demo images (6 to train on) and a float64 plan of 2x2 tiles."""
    root = tiny_float64_run(tmp_path_factory.mktemp("resilience"), size=SIZE)
    assert load_plan(root / "plan.yaml").tile_grid().n_tiles > 1
    return root


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As ``setup`` with 24 images of 192 px (3x3 tiles): a run of several seconds, so that
    signals sent at random moments land inside its epochs."""
    return tiny_float64_run(tmp_path_factory.mktemp("slow"), n=24, size=192)


def _trainer(setup: Path, out: Path, policy: RunPolicy | None = None, csv: Path | None = None,
             **options: object) -> Trainer:  # fmt: skip
    """A run of the CLI's kind, in this process: the model built as `train` builds it; images
    of ``csv`` are streamed from their files as slides."""
    plan = load_plan(setup / "plan.yaml")
    spec = RunSpec.from_plan(plan, epochs=EPOCHS, batch=2, lr=1e-2, num_workers=0, seed=7,
                             **options)  # fmt: skip
    torch.manual_seed(spec.seed)
    loaded = load_model_file(setup / "tiny.py", batch_norm=spec.batch_norm)
    if csv is None:
        data = load_csv(setup / "demo" / "train.csv", target_shape=plan.image_shape_px)
    else:
        data = load_csv(csv, target_shape=plan.image_shape_px, settings=spec.data,
                        command="train")  # fmt: skip
    return Trainer(model=loaded.model, trunk=loaded.trunk, head=loaded.head, plan=plan,
                   spec=spec, train_data=data, val_data=None, out_dir=out,
                   device=torch.device("cpu"), policy=policy)  # fmt: skip


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def _without_times(path: Path) -> list[tuple]:
    return [(m.epoch, m.train_loss, m.train_accuracy, m.skipped) for m in load_metrics(path)]


def test_a_stop_at_any_point_resumes_to_the_same_weights(setup: Path, tmp_path: Path) -> None:
    """Stopped at every step start, between the two images of every step (the partial
    accumulation is dropped) and after every epoch, then resumed in a new trainer: the final
    weights, optimizer state and metrics equal an uninterrupted run's exactly."""
    reference = _trainer(setup, tmp_path / "ref")
    reference.fit(progress=False)
    ref = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    looks = StopAt(10**9)
    _trainer(setup, tmp_path / "count").fit(progress=False, stop=looks)
    # Per epoch: 3 steps of 2 images (a look before each and between the two), one before
    # validation and one at the epoch's end.
    assert looks.looks == EPOCHS * (3 * 2 + 2)
    mid_epoch = 0
    for n in range(looks.looks - 1):  # the last look comes after the last epoch
        out = tmp_path / f"stop{n}"
        with pytest.raises(RunInterruptedError, match="stopped by SIGTERM") as stopped:
            _trainer(setup, out).fit(progress=False, stop=StopAt(n))
        assert "--resume" in str(stopped.value)
        mid_epoch += bool(load_checkpoint(out / "last.pt").meta.progress)
        resumed = _trainer(setup, out)
        resumed.resume()
        resumed.fit(progress=False)
        got = torch.load(out / "last.pt", weights_only=True)
        _assert_identical(got["model"], ref["model"])
        assert str(got["optimizer"]) == str(ref["optimizer"]), f"optimizer after stop {n}"
        assert _without_times(out) == _without_times(tmp_path / "ref"), f"metrics, stop {n}"
    assert mid_epoch == looks.looks - 1 - (EPOCHS - 1)  # all but the epoch ends were mid-epoch


def test_a_stop_inside_a_step_puts_train_mode_batch_norm_back(tmp_path: Path) -> None:
    """BatchNorm trained on batch statistics moves its running statistics with each image: a
    stop between the images of a step puts them back, so the resumed run ends with the same
    weights and statistics."""
    from tests.tileplan.conftest import TINY_GLOBAL_MODEL

    (tmp_path / "global.py").write_text(TINY_GLOBAL_MODEL)
    for args in (
        ["demo-data", tmp_path / "demo", "--n", 8, "--size", SIZE, "--seed", 4],
        ["profile", tmp_path / "global.py", "--image", SIZE, "--bn", "train", "--max-tile", 48,
         "--dtype", "float64", "--no-measure", "--budget", "2GiB", "--out", tmp_path / "plan.yaml"],
    ):  # fmt: skip
        code, out = run_cli(*args)
        assert code == 0, out
    (tmp_path / "tiny.py").write_text(TINY_GLOBAL_MODEL)  # _trainer builds <setup>/tiny.py
    _trainer(tmp_path, tmp_path / "ref").fit(progress=False)
    reference = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)["model"]
    assert any("running_mean" in k for k in reference)
    for n in (1, 9, 17):  # between the two images of a step, in each epoch (8 looks each)
        out = tmp_path / f"stop{n}"
        with pytest.raises(RunInterruptedError, match="images so far were dropped"):
            _trainer(tmp_path, out).fit(progress=False, stop=StopAt(n))
        resumed = _trainer(tmp_path, out)
        resumed.resume()
        resumed.fit(progress=False)
        _assert_identical(_weights(out / "last.pt"), reference)


def test_checkpoints_come_at_the_cadence_asked(setup: Path, tmp_path: Path) -> None:
    """``--checkpoint-every 2`` (steps): mid-epoch checkpoints on every second step boundary,
    and a resume from one of them equals the uninterrupted run."""
    seen: list[str] = []
    real = trainer_module.save_checkpoint

    def spy(path: Path, checkpoint: object) -> Path:
        seen.append(checkpoint.meta.describe())  # type: ignore[attr-defined]
        written = real(path, checkpoint)
        if seen[-1] == "in epoch 2 after step 2":
            shutil.copy(written, tmp_path / "mid.pt")
        return written

    policy = RunPolicy(checkpoint_every=Cadence(steps=2))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module, "save_checkpoint", spy)
        _trainer(setup, tmp_path / "a", policy).fit(progress=False)
    assert seen == ["in epoch 1 after step 2", "after epoch 1", "in epoch 2 after step 2",
                    "after epoch 2", "in epoch 3 after step 2", "after epoch 3"]  # fmt: skip
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "mid.pt", tmp_path / "b" / "last.pt")
    resumed = _trainer(setup, tmp_path / "b", policy)
    resumed.resume()
    resumed.fit(progress=False)
    _assert_identical(_weights(tmp_path / "b" / "last.pt"), _weights(tmp_path / "a" / "last.pt"))


@pytest.mark.parametrize("text", ["500", "500 steps", "90s", "30m", "2h"])
def test_checkpoint_cadences_parse(text: str) -> None:
    cadence = Cadence.parse(text)
    assert Cadence.parse(str(cadence)) == cadence


@pytest.mark.parametrize("text", ["0", "-3", "ten", "1.5 steps", "5d"])
def test_a_bad_cadence_is_one_line(text: str) -> None:
    with pytest.raises(ValueError, match="cadence|whole number"):
        Cadence.parse(text)


# -- real signals -------------------------------------------------------------------------------


def _train_cmd(setup: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tileplan", "-v", "train", str(setup / "tiny.py"), "--plan",
            str(setup / "plan.yaml"), "--data", str(setup / "demo" / "train.csv"), "--out",
            str(out), "--epochs", str(EPOCHS), "--batch", "2", "--lr", "1e-2", "--seed", "7",
            "--num-workers", "0", "--no-report", "--device", "cpu", *extra]  # fmt: skip


_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _signalled(cmd: list[str], delay: float | None, marker: str = "training from epoch"
               ) -> tuple[int, str]:  # fmt: skip
    """Run ``cmd``, send SIGTERM ``delay`` s after it says it trains (None: never); (exit
    status, stderr)."""
    proc = subprocess.Popen(cmd, env=_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    lines: list[str] = []
    started = threading.Event()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if marker in line:
                started.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        if started.wait(timeout=300):
            try:
                proc.wait(
                    timeout=600 if delay is None else delay
                )  # ended on its own before the moment came
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=30)
    assert proc.stderr is not None
    proc.stderr.close()
    return code, "".join(lines)


def _finished(out: Path) -> bool:
    """The run wrote its last epoch's checkpoint (a signal after that kills it: no loop is
    left to stop cleanly)."""
    return (out / "last.pt").is_file() and load_checkpoint(out / "last.pt").meta.epoch == EPOCHS


def test_sigterm_at_random_points_resumes_to_the_same_weights(slow: Path, tmp_path: Path) -> None:
    """`tileplan train` in its own process, SIGTERM at 10 random moments of a 3-epoch float64
    run: it exits with status 75 saying where it stopped, and `--resume` ends with the weights
    of the run that was never stopped."""
    code, err = _signalled(_train_cmd(slow, tmp_path / "whole"), None)  # never signalled
    assert code == 0, err[-2000:]
    seconds = sum(m.seconds for m in load_metrics(tmp_path / "whole"))
    reference = _weights(tmp_path / "whole" / "last.pt")
    rng = random.Random(21)
    stopped = 0
    for k in range(10):
        out = tmp_path / f"run{k}"
        code, err = _signalled(_train_cmd(slow, out), rng.uniform(0.0, seconds))
        if code in (0, -signal.SIGTERM) and _finished(out):
            continue
        assert code == EXIT_INTERRUPTED, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("stopped by SIGTERM"), last
        assert "--resume" in last
        assert str(out / "last.pt") in last
        stopped += 1
        again = subprocess.run([*_train_cmd(slow, out), "--resume"], env=_ENV,
                               capture_output=True, text=True, timeout=600)  # fmt: skip
        assert again.returncode == 0, again.stderr[-2000:]
        _assert_identical(_weights(out / "last.pt"), reference)
    assert stopped >= 5, "most signals should land while training"


def test_a_second_signal_exits_at_once() -> None:
    """The first SIGTERM only asks the loop to stop, as does a copy of it right after (a
    scheduler and torchrun both deliver one preemption); a later one ends the process by
    that signal, whatever it is doing."""
    script = (
        "import os, signal, time\n"
        "from tileplan.run.interrupts import stop_on_signals\n"
        "with stop_on_signals() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"  # the same preemption, twice
        "    time.sleep(0.2)\n"
        "    print('asked', stop.signal, flush=True)\n"
        f"    time.sleep({DUPLICATE_WINDOW_S})\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "print('not reached')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.stdout == "asked SIGTERM\n", run.stderr
    assert run.returncode == -signal.SIGTERM


def test_sigterm_under_torchrun_stops_every_rank_and_resumes_exactly(
    slow: Path, tmp_path: Path
) -> None:
    """Two ranks (gloo): SIGTERM to the launcher reaches both; they stop at the same step,
    rank 0 writes the checkpoint, and a resumed torchrun run ends where the uninterrupted one
    does."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "--tee", "3", "-m", "tileplan", "-v"]  # fmt: skip

    def cmd(out: Path, *extra: str) -> list[str]:
        return [*launcher, *_train_cmd(slow, out, "--batch", "4", *extra)[4:]]

    code, err = _signalled(cmd(tmp_path / "whole"), None)
    assert code == 0, err[-3000:]
    seconds = sum(m.seconds for m in load_metrics(tmp_path / "whole"))
    reference = _weights(tmp_path / "whole" / "last.pt")
    stopped = 0
    for k, share in enumerate((0.3, 0.6)):
        out = tmp_path / f"ddp{k}"
        code, err = _signalled(cmd(out), share * seconds)
        if _finished(out):
            continue
        assert "stopped by SIGTERM" in err, err[-3000:]
        assert err.count("stopped by SIGTERM") == 2, "both ranks stop, at the same step"
        assert len(load_checkpoint(out / "last.pt").meta.progress) in (0, 2)
        stopped += 1
        again = subprocess.run([*cmd(out), "--resume"], env=_ENV, capture_output=True,
                               text=True, timeout=600)  # fmt: skip
        assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
        _assert_identical(_weights(out / "last.pt"), reference)
    assert stopped, "a signal should land while training"


# -- unreadable data ----------------------------------------------------------------------------


def _corrupt_tile(path: Path) -> None:
    """Overwrite the second half of one JPEG tile of level 0 with its first half (4 KB or so,
    as a bad sector or a broken copy does): it decodes to 'two SOI markers'."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset = page.dataoffsets[len(page.dataoffsets) // 2]
        count = page.databytecounts[len(page.dataoffsets) // 2]
    raw = bytearray(path.read_bytes())
    half = count // 2
    raw[offset + half : offset + 2 * half] = raw[offset : offset + half]
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight demo slides (four pyramidal TIFFs), a copy of one with a corrupt tile, and a
    float64 plan; ``all.csv`` lists the TIFFs and the corrupt one, ``mid.csv`` also
    ``late.tif``, whole now, which a test truncates after training starts."""
    from tests.tileplan.conftest import TINY_MODEL

    root = tmp_path_factory.mktemp("badslides")
    (root / "tiny.py").write_text(TINY_MODEL)
    code, out = run_cli("demo-data", root / "s", "--slides", "--n", 8, "--size", 320,
                     "--seed", 5)  # fmt: skip
    assert code == 0, out
    tifs = sorted((root / "s").glob("*.tif"))
    shutil.copy(tifs[0], root / "s" / "corrupt.tif")
    _corrupt_tile(root / "s" / "corrupt.tif")
    rows = ["image,label", *(f"{p.name},{i % 2}" for i, p in enumerate(tifs)), "corrupt.tif,1"]
    (root / "s" / "all.csv").write_text("\n".join(rows) + "\n")
    (root / "s" / "mid.csv").write_text("\n".join([*rows, "late.tif,0"]) + "\n")
    shutil.copy(tifs[1], root / "s" / "late.tif")
    code, out = run_cli("profile", root / "tiny.py", "--data", root / "s" / "mid.csv", "--tile", 64,
                     "--dtype", "float64", "--no-measure", "--budget", "2GiB",
                     "--out", root / "plan.yaml")  # fmt: skip
    assert code == 0, out
    return root


def _train_slides(slides: Path, out: Path, *extra: object) -> tuple[int, str]:
    return run_cli("train", slides / "tiny.py", "--plan", slides / "plan.yaml", "--data",
                slides / "s" / "all.csv", "--out", out, "--epochs", 2, "--batch", 2,
                "--num-workers", 1, "--no-report", *extra)  # fmt: skip


def test_a_corrupt_tile_stops_the_run_naming_it(slides: Path, tmp_path: Path) -> None:
    code, out = _train_slides(slides, tmp_path / "r")
    assert code == 1
    line = out.strip().splitlines()[-1]
    assert "row" in line
    assert "all.csv row 5" in line
    assert "corrupt.tif" in line
    assert "level 0, region y" in line
    assert "Jpeg8Error" in line
    assert "no checkpoint was written yet" in line
    assert "--on-read-error skip" in line
    assert "check-data" in line
    assert "Traceback" not in out


def test_unreadable_images_are_skipped_and_listed(slides: Path, tmp_path: Path) -> None:
    """``--on-read-error skip``: the corrupt slide is left out of each epoch, listed in
    skipped.csv with its reason and counted in the metrics; past --max-skipped the run
    stops."""
    run = tmp_path / "skip"
    code, out = _train_slides(slides, run, "--on-read-error", "skip", "--max-skipped", 0.2)
    assert code == 0, out
    skipped = (run / "skipped.csv").read_text().splitlines()
    assert skipped[0] == "epoch,step,phase,csv,row,image,reason"
    assert len(skipped) == 1 + 2  # one image, two epochs
    assert all("corrupt.tif" in line and "Jpeg8Error" in line for line in skipped[1:])
    assert [m.skipped for m in load_metrics(run)] == [1, 1]
    assert "1 images skipped" in out
    assert len(load_checkpoint(run / "last.pt").meta.skipped) == 2
    code, out = _train_slides(slides, tmp_path / "stop", "--on-read-error", "skip",
                              "--max-skipped", 0.1)  # fmt: skip
    assert code == 1
    assert "1 of 5 training images failed to read, more than --max-skipped 0.1" in out


def test_a_file_truncated_mid_run_is_skipped(slides: Path, tmp_path: Path) -> None:
    """``late.tif`` passes the checks at the start and is cut short while the run goes on (a
    copy still being written, a failing network share): both bad slides are skipped, in
    every epoch, and the others train."""
    late = tmp_path / "s"
    shutil.copytree(slides / "s", late)
    trainer = _trainer(slides, tmp_path / "r", RunPolicy(on_read_error="skip", max_skipped=0.5),
                       csv=late / "mid.csv")  # fmt: skip
    raw = (late / "late.tif").read_bytes()
    (late / "late.tif").write_bytes(raw[: len(raw) // 2])
    history = trainer.fit(progress=False)
    assert [m.skipped for m in history] == [2] * EPOCHS
    names = {(r.epoch, Path(r.image).name) for r in trainer.skipped}
    assert names == {(e, n) for e in range(1, EPOCHS + 1) for n in ("corrupt.tif", "late.tif")}
    assert all(r.phase == "train" and r.row in (5, 6) for r in trainer.skipped)


def test_check_data_finds_the_bad_slides(slides: Path, tmp_path: Path) -> None:
    result = check_data(slides / "s" / "all.csv", plan_file=slides / "plan.yaml",
                        settings=DataSettings(), workers=2, block=128)  # fmt: skip
    assert result.images == 5
    assert {Path(b.image).name for b in result.bad} == {"corrupt.tif"}
    corrupt = [b for b in result.bad if b.image.endswith("corrupt.tif")]
    assert len(corrupt) < result.blocks // 4, "only the blocks over the bad tile fail"
    assert all("level 0, region y" in b.reason for b in corrupt)
    assert result.pixels > 0
    code, out = run_cli("check-data", slides / "s" / "all.csv", "--plan", slides / "plan.yaml",
                     "--workers", 1, "--out", tmp_path / "bad.csv")  # fmt: skip
    assert code == 1
    assert "all.csv row 5: " in out
    assert "corrupt.tif" in out
    assert (tmp_path / "bad.csv").read_text().startswith("csv,row,image,reason")
    # A file cut short before the check is refused by its header, as train would refuse it.
    shutil.copytree(slides / "s", tmp_path / "s")
    raw = (tmp_path / "s" / "late.tif").read_bytes()
    (tmp_path / "s" / "late.tif").write_bytes(raw[: len(raw) // 2])
    code, out = run_cli("check-data", tmp_path / "s" / "mid.csv", "--plan", slides / "plan.yaml")
    assert code == 1
    assert "mid.csv row 6: cannot read 'late.tif': file is truncated" in out


def test_check_data_passes_clean_data(slides: Path) -> None:
    clean = slides / "s" / "train.csv"
    code, out = run_cli("check-data", clean, "--plan", slides / "plan.yaml", "--workers", 1)
    assert code == 0, out
    assert "0 blocks of 0 images failed" in out


def test_a_read_error_in_memory_data_is_one_line(setup: Path, tmp_path: Path) -> None:
    """Plain images read whole: one that turns unreadable mid-run is named with its row."""
    shutil.copytree(setup / "demo", tmp_path / "demo")
    trainer = _trainer(setup, tmp_path / "r")
    trainer.train_data = load_csv(tmp_path / "demo" / "train.csv", target_shape=(SIZE, SIZE))
    victim = trainer.train_data.samples[0]
    victim.path.write_bytes(b"II*\x00" + b"\x00" * 10)  # now a broken TIFF
    with pytest.raises(ImageReadError) as failed:
        trainer.fit(progress=False)
    message = str(failed.value)
    assert f"train.csv row {victim.row}: cannot read '{victim.path}'" in message
    assert "\n" not in message


# -- storage ------------------------------------------------------------------------------------


def test_a_failed_checkpoint_write_keeps_the_previous_one(setup: Path, tmp_path: Path) -> None:
    """The disk fills while the epoch-2 checkpoint is written: one line names the file and
    says which checkpoint remains, and that one loads with the epoch-1 weights."""
    run = tmp_path / "r"
    calls = 0

    def full_disk(path: Path, write: object) -> Path:
        nonlocal calls
        calls += 1
        if calls < 2:
            return atomic_write(path, write)  # type: ignore[arg-type]

        def half_then_full(f: object) -> None:
            f.write(b"\0" * 1000)  # type: ignore[attr-defined]
            raise OSError(errno.ENOSPC, "No space left on device")

        return atomic_write(path, half_then_full)

    trainer = _trainer(setup, run)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("tileplan.run.checkpoint.atomic_write", full_disk)
        with pytest.raises(TrainError) as failed:
            trainer.fit(progress=False)
    message = str(failed.value)
    assert f"cannot write '{run / 'last.pt'}'" in message
    assert "No space left on device" in message
    assert "(after epoch 1) is the last good checkpoint" in message
    assert load_checkpoint(run / "last.pt").meta.epoch == 1
    assert sorted(p.name for p in run.iterdir()) == ["last.pt", "metrics.jsonl"]


def test_a_folder_without_room_for_a_checkpoint_is_refused(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(TrainError, match="free, and a checkpoint of this model needs"):
        check_space(tmp_path / "new" / "run", free * 2)
    check_space(tmp_path / "new" / "run", 1 << 20)
