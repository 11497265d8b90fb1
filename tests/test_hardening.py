"""A user's mistakes and changed files: each a one-line error found before the work, with nothing
already computed lost; resumes that would mix two experiments refused.

Real components throughout: the shipped models, real SQLite databases, real image, ``.npy``,
checkpoint and factory files on disk, the CLI through typer's runner.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from underfire import load_model, run_experiment
from underfire.cli import app
from underfire.data import ShapesDataset, export_dataset, read_image
from underfire.data import images as image_module
from underfire.errors import ImageReadError, InputError, SpecError
from underfire.interpreters import build_interpreter
from underfire.interpreters.rts import SHIPPED_RTS, shipped_rts_path
from underfire.models.specs import builtin_weights_path
from underfire.progress import LogProgress
from underfire.runs import load_experiment_config
from underfire.store import DATABASE_NAME, SCHEMA_VERSION
from underfire.threads import choose_threads, idle_cores, idle_cpus, idle_now

runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def one_error_line(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def count_rows(run_dir: Path) -> int:
    with sqlite3.connect(run_dir / DATABASE_NAME) as connection:
        return int(connection.execute("SELECT COUNT(*) FROM results").fetchone()[0])


def tiny_config(
    folder: Path, *, extra: str = "", experiment: str = "", interpreters: str = '["cam"]', model: str = "shapes-resnet"
) -> Path:
    """Two PGD units of one step each: the cheapest run with something to resume."""
    path = folder / "experiment.toml"
    path.write_text(
        f"""
[experiment]
name = "tiny"
images = 4
batch_size = 2
models = [{json.dumps(model)}]
interpreters = {interpreters}
attacks = ["pgd"]
transfer = false
{experiment}
[overrides]
pgd_steps = 1
adv_steps = 0
{extra}
"""
    )
    return path


def picture_files(folder: Path, count: int, stem: str = "p") -> list[str]:
    """``count`` shapes test images as PNG files in ``folder``."""
    paths = []
    for index in range(count):
        path = folder / f"{stem}{index}.png"
        Image.fromarray(ShapesDataset("test").render(index).image).save(path)
        paths.append(str(path))
    return paths


def kill_last_unit(run_dir: Path, images: tuple[str, ...]) -> int:
    """What a run killed during its last unit leaves: every row but that unit's. Returns the rows left."""
    with sqlite3.connect(run_dir / DATABASE_NAME) as connection:
        connection.execute(f"DELETE FROM results WHERE image IN ({', '.join('?' * len(images))})", images)
    return count_rows(run_dir)


def rows_of(run_dir: Path) -> dict[tuple[str, ...], tuple[float, float]]:
    with sqlite3.connect(run_dir / DATABASE_NAME) as connection:
        rows = connection.execute(
            "SELECT model, interpreter, attack, target_map, image, iou, l1 FROM results"
        ).fetchall()
    return {tuple(row[:5]): tuple(row[5:]) for row in rows}


def resume_is_refused_then_restored(
    tmp_path: Path, config_path: Path, changed: Path, change: callable, needle: str
) -> None:
    """Run, lose the last unit, change ``changed``: the resume is one line naming it and computes
    nothing; with the original contents back, the resume completes the same run."""
    run_dir = tmp_path / "run"
    run_experiment(load_experiment_config(config_path), run_dir)
    full = rows_of(run_dir)
    last_batch = tuple(sorted({key[4] for key in full})[-2:])
    left = kill_last_unit(run_dir, last_batch)
    original = changed.read_bytes()
    change(changed)
    with pytest.raises(InputError) as error:
        run_experiment(load_experiment_config(config_path), run_dir)
    message = str(error.value)
    assert "\n" not in message and "changed since the run" in message and needle in message, message
    assert count_rows(run_dir) == left  # nothing computed, nothing lost
    changed.write_bytes(original)
    run_experiment(load_experiment_config(config_path), run_dir)
    assert rows_of(run_dir) == full


# ----------------------------------------------------------------- silent wrong results
def test_weights_that_do_not_apply_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = cli(
        "attack",
        "-m",
        "shapes-resnet",
        "--weights",
        "/nonexistent.pth",
        "--data",
        "shapes:test",
        "--limit",
        "2",
        "--out",
        out,
    )
    one_error_line(code, err, "does not apply to the built-in model 'shapes-resnet'")
    assert not out.exists()
    with pytest.raises(SpecError, match="does not apply to checkpoint"):
        load_model(str(builtin_weights_path("shapes-resnet")), weights=str(tmp_path / "other.pt"))


def test_resume_refuses_a_changed_target_map(tmp_path: Path) -> None:
    target = tmp_path / "target.npy"
    square = np.zeros((8, 8), np.float32)
    square[2:5, 2:5] = 1
    np.save(target, square)
    config = tiny_config(tmp_path, experiment=f"target_maps = [{json.dumps(str(target))}]")

    def move(path: Path) -> None:
        np.save(path, np.roll(square, 2, axis=1))

    resume_is_refused_then_restored(tmp_path, config, target, move, str(target))


def test_resume_refuses_a_changed_image_file(tmp_path: Path) -> None:
    files = picture_files(tmp_path, 4, stem="picture")
    config = tiny_config(tmp_path, experiment=f"files = {json.dumps(files)}")

    def repaint(path: Path) -> None:
        pixels = np.asarray(Image.open(path)).copy()
        pixels[:8, :8] = 255 - pixels[:8, :8]
        Image.fromarray(pixels).save(path)

    resume_is_refused_then_restored(tmp_path, config, Path(files[3]), repaint, "picture3.png")


def test_resume_refuses_a_changed_image_in_a_data_folder(tmp_path: Path) -> None:
    folder = export_dataset(ShapesDataset("test"), tmp_path / "folder", limit=30)
    config = tiny_config(tmp_path, experiment=f"data = {json.dumps(str(folder))}")
    run_dir = tmp_path / "run"
    run_experiment(load_experiment_config(config), run_dir)
    rows = count_rows(run_dir)
    for path in (folder / "images").rglob("*.png"):  # one pixel of each: the same pictures to a viewer
        pixels = np.asarray(Image.open(path)).copy()
        pixels[0, 0] = 255 - pixels[0, 0]
        Image.fromarray(pixels).save(path)
    with pytest.raises(InputError, match="changed since the run") as error:
        run_experiment(load_experiment_config(config), run_dir)
    assert str(folder / "images") in str(error.value) and "\n" not in str(error.value)
    assert count_rows(run_dir) == rows


def test_resume_refuses_changed_checkpoint_weights(tmp_path: Path) -> None:
    weights = tmp_path / "mine.safetensors"
    shutil.copy(builtin_weights_path("shapes-resnet"), weights)
    shutil.copy(builtin_weights_path("shapes-resnet").with_suffix(".json"), weights.with_suffix(".json"))
    config = tiny_config(tmp_path, model=str(weights))

    def retrain(path: Path) -> None:
        state = load_file(path)
        state["fc.bias"] = state["fc.bias"] + 0.01
        save_file(state, path)

    resume_is_refused_then_restored(tmp_path, config, weights, retrain, "mine.safetensors")


def test_resume_refuses_a_changed_rts_network(tmp_path: Path) -> None:
    network = tmp_path / "rts.safetensors"
    shipped = shipped_rts_path(SHIPPED_RTS["shapes-resnet"])
    shutil.copy(shipped, network)
    shutil.copy(shipped.with_suffix(".json"), network.with_suffix(".json"))
    config = tiny_config(
        tmp_path, interpreters='["rts"]', extra=f"[interpreters.rts]\ncheckpoint = {json.dumps(str(network))}"
    )

    def retrain(path: Path) -> None:
        state = load_file(path)
        key = next(name for name in state if name.endswith("selector.weight"))
        state[key] = state[key] * 1.01
        save_file(state, path)

    resume_is_refused_then_restored(tmp_path, config, network, retrain, "rts.safetensors")


FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
"""


def test_resume_refuses_a_changed_factory_file(tmp_path: Path) -> None:
    factory = tmp_path / "mynet.py"
    factory.write_text(FACTORY)
    spec = f"{factory}:make"
    files = picture_files(tmp_path, 4)
    config = tiny_config(
        tmp_path,
        model=spec,
        experiment=f"files = {json.dumps(files)}",
        extra=f"[models.{json.dumps(spec)}]\ninput_size = 64\nclasses = {json.dumps([str(i) for i in range(10)])}",
    )

    def edit(path: Path) -> None:
        path.write_text(FACTORY.replace("nn.Conv2d(3, 4, 3, padding=1)", "nn.Conv2d(3, 4, 5, padding=2)"))

    resume_is_refused_then_restored(tmp_path, config, factory, edit, "mynet.py")


def test_resume_refuses_a_changed_model_card_or_torchscript_file(tmp_path: Path) -> None:
    namespace: dict = {}
    exec(FACTORY, namespace)
    archive = tmp_path / "net.pt"
    torch.jit.script(namespace["make"]()).save(str(archive))
    card = tmp_path / "net.toml"
    card.write_text(f"input_size = 64\nclasses = {json.dumps([str(i) for i in range(10)])}\nmean = [0.5, 0.5, 0.5]\n")
    files = picture_files(tmp_path, 4)
    config = tiny_config(
        tmp_path, model=f"torchscript:{archive}", interpreters='["grad"]', experiment=f"files = {json.dumps(files)}"
    )

    def renormalise(path: Path) -> None:
        path.write_text(path.read_text().replace("mean = [0.5, 0.5, 0.5]", "mean = [0.4, 0.4, 0.4]"))

    resume_is_refused_then_restored(tmp_path / "card", config, card, renormalise, "net.toml")

    def retrain(path: Path) -> None:
        model = namespace["make"]()
        with torch.no_grad():
            model[-1].bias.add_(0.01)
        torch.jit.script(model).save(str(path))

    resume_is_refused_then_restored(tmp_path / "archive", config, archive, retrain, "net.pt")


def test_constant_or_empty_target_maps_are_refused(tmp_path: Path) -> None:
    for name, array, needle in (
        ("zero.npy", np.zeros((8, 8)), "is constant"),
        ("flat.npy", np.full((8, 8), 0.3), "is constant"),
        ("empty.npy", np.zeros((0, 8)), "is empty"),
    ):
        np.save(tmp_path / name, array)
        out = tmp_path / f"out-{name}"
        code, _, err = cli(
            "attack", "--data", "shapes:test", "--limit", "2", "--target-map", tmp_path / name, "--out", out
        )
        one_error_line(code, err, needle)
        assert not out.exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("finished")
    run_dir = folder / "run"
    run_experiment(load_experiment_config(tiny_config(folder)), run_dir)
    return run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    return copy


def test_a_newer_schema_is_refused_before_any_work(finished_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(finished_run, tmp_path)
    left = kill_last_unit(run_dir, tuple(sorted({key[4] for key in rows_of(run_dir)})[-2:]))
    with sqlite3.connect(run_dir / DATABASE_NAME) as connection:
        connection.execute("PRAGMA user_version = 99")
    config = tiny_config(tmp_path)
    code, _, err = cli("run", config, "--out", run_dir)
    one_error_line(code, err, "schema version 99")
    assert count_rows(run_dir) == left
    code, _, err = cli("report", run_dir)
    one_error_line(code, err, "schema version 99")


def test_a_database_missing_columns_is_refused_before_any_unit(finished_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(finished_run, tmp_path)
    with sqlite3.connect(run_dir / DATABASE_NAME) as connection:
        connection.execute("ALTER TABLE results DROP COLUMN spearman")
        connection.execute("DELETE FROM results WHERE image = 'test-00003'")
    before = count_rows(run_dir)
    code, _, err = cli("run", tiny_config(tmp_path), "--out", run_dir)
    one_error_line(code, err, "has no column spearman")
    assert count_rows(run_dir) == before
    code, _, err = cli("report", run_dir)
    one_error_line(code, err, "no column spearman")


def test_an_older_schema_is_migrated_and_resumed(finished_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(finished_run, tmp_path)
    full = rows_of(run_dir)
    with sqlite3.connect(run_dir / DATABASE_NAME) as connection:
        connection.execute("ALTER TABLE results DROP COLUMN interpreter_options")
        connection.execute("PRAGMA user_version = 1")
    kill_last_unit(run_dir, tuple(sorted({key[4] for key in full})[-2:]))
    code, _, err = cli("run", tiny_config(tmp_path), "--out", run_dir)
    assert code == 0, err
    assert rows_of(run_dir) == full
    with sqlite3.connect(run_dir / DATABASE_NAME) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


@pytest.mark.parametrize("contents", [b"not a database at all", None])
def test_a_broken_results_file_is_one_line(finished_run: Path, tmp_path: Path, contents: bytes | None) -> None:
    run_dir = copy_run(finished_run, tmp_path)
    database = run_dir / DATABASE_NAME
    data = database.read_bytes()
    broken = contents if contents is not None else data[: len(data) // 3]  # truncated
    for extra in run_dir.glob(f"{DATABASE_NAME}-*"):  # a WAL would rescue the truncated file
        extra.unlink()
    database.write_bytes(broken)
    code, _, err = cli("run", tiny_config(tmp_path), "--out", run_dir)
    one_error_line(code, err, "results.sqlite")
    assert database.read_bytes() == broken  # left as it was, for the user to look at


def test_one_class_for_several_images_is_an_error() -> None:
    classifier = load_model("shapes-resnet")
    images, labels, _ = ShapesDataset("test").tensors(range(2))
    cam = build_interpreter("cam", classifier)
    with pytest.raises(InputError, match="got 1 classes for 2 images"):
        cam(images, [3])
    with pytest.raises(InputError, match="got 1 classes for 2 images"):
        cam(images, torch.tensor([3]))
    assert torch.equal(cam(images, 3), cam(images, [3, 3]))  # a single int is for every image
    assert torch.equal(cam(images, torch.tensor(3)), cam(images, [3, 3]))


# ----------------------------------------------------------------- one-line errors
@pytest.mark.parametrize("command", ["explain", "attack", "run", "export"])
def test_output_folders_that_cannot_be_written_are_refused_first(tmp_path: Path, command: str) -> None:
    (picture,) = map(Path, picture_files(tmp_path, 1, stem="picture"))
    a_file = tmp_path / "taken"
    a_file.write_text("something")
    config = tiny_config(tmp_path)
    for out, needle in (
        (a_file, "is a file"),
        (a_file / "below", "is a file"),
        (Path("/proc/underfire-out"), "cannot write"),
    ):
        args = {
            "explain": ("explain", picture, "--out", out),
            "attack": ("attack", picture, "--out", out),
            "run": ("run", config, "--out", out),
            "export": ("data", "export", "shapes:test", out, "--limit", "2"),
        }[command]
        code, _, err = cli(*args)
        one_error_line(code, err, needle)
    assert a_file.read_text() == "something"


def test_report_outputs_that_are_folders_are_refused(finished_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(finished_run, tmp_path)
    code, _, err = cli("report", run_dir, "--out", tmp_path)
    one_error_line(code, err, "is a folder")
    (tmp_path / "attack").mkdir()
    (tmp_path / "attack" / "report.json").mkdir()
    code, _, err = cli(
        "attack",
        "--data",
        "shapes:test",
        "--limit",
        "2",
        "--out",
        tmp_path / "attack",
        "--pgd-steps",
        "1",
        "--adv-steps",
        "1",
    )
    one_error_line(code, err, "report.json", "is a directory")
    assert not (tmp_path / "attack" / DATABASE_NAME).exists()  # found before the attack, not after it


@pytest.mark.parametrize(
    "body, needle",
    [
        (b'[experiment]\nname = "caf\xe9"\n', "is not UTF-8 text (byte 0xe9 on line 2)"),
        (b"[experiment]\nseed = 100000000000000000000\n", "experiment.seed must be a whole number in 0..4294967295"),
        (b"[experiment]\nseed = 1e20\n", "experiment.seed must be a whole number"),
        (b"[experiment]\nseed = -1\n", "experiment.seed must be a whole number"),
    ],
)
def test_broken_configs_are_one_line(tmp_path: Path, body: bytes, needle: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_bytes(body)
    code, _, err = cli("run", config, "--out", tmp_path / "run")
    one_error_line(code, err, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["0", "-3"])
def test_counts_below_one_are_refused(tmp_path: Path, value: str) -> None:
    (picture,) = map(Path, picture_files(tmp_path, 1, stem="picture"))
    for args, flag in (
        (("explain", picture, "--out", tmp_path / "maps", "--batch-size", value), "--batch-size"),
        (("evaluate", "--limit", "4", "--batch-size", value), "--batch-size"),
        (("attack", picture, "--out", tmp_path / "attack", "--batch-size", value), "--batch-size"),
        (("data", "export", "shapes:test", tmp_path / "export", "--limit", value), "--limit"),
        (("evaluate", "--limit", value), "--limit"),
    ):
        code, _, err = cli(*args)
        one_error_line(code, err, flag)
    assert not any((tmp_path / name).exists() for name in ("maps", "attack", "export"))


def test_float64_images_are_converted_like_peers_do() -> None:
    classifier = load_model("shapes-resnet")
    images, labels, _ = ShapesDataset("test").tensors(range(2))
    for name in ("grad", "cam"):
        interpreter = build_interpreter(name, classifier)
        assert torch.allclose(interpreter(images.double(), labels), interpreter(images, labels))
    assert torch.equal(classifier.predict(images.double()), classifier.predict(images))
    from underfire.attacks import ATTACKS
    from underfire.attacks.config import AttackConfig

    pgd = ATTACKS.get("pgd")(classifier, AttackConfig(pgd_steps=2, adv_steps=0))
    targets = (labels + 1) % 10
    assert torch.equal(pgd(images.double(), targets).adversarial, pgd(images, targets).adversarial)


@pytest.mark.parametrize(
    "source, needle",
    [
        ("def make():\n    raise ValueError('my factory is broken')\n", "raised ValueError: my factory is broken at "),
        ("import no_such_module_anywhere\n\ndef make():\n    pass\n", "No module named 'no_such_module_anywhere' at "),
        ("def make(:\n    pass\n", "raised SyntaxError"),
    ],
)
def test_an_error_in_a_users_factory_names_the_spec_and_the_users_line(
    tmp_path: Path, source: str, needle: str
) -> None:
    factory = tmp_path / "net.py"
    factory.write_text(source)
    (picture,) = map(Path, picture_files(tmp_path, 1, stem="picture"))
    code, _, err = cli("explain", picture, "--out", tmp_path / "maps", "-m", f"{factory}:make")
    one_error_line(code, err, needle, "net.py")
    assert f"{factory}:" in err  # the file and line of the user's own code


def test_export_limit_zero_writes_and_claims_nothing(tmp_path: Path) -> None:
    code, out, err = cli("data", "export", "shapes:test", tmp_path / "x", "--limit", "0")
    one_error_line(code, err, "--limit")
    assert out == "" and not (tmp_path / "x").exists()
    code, out, _ = cli("data", "export", "shapes:test", tmp_path / "y", "--limit", "1")
    assert code == 0 and "wrote 1 image to" in out


# ----------------------------------------------------------------- also
def test_a_batch_job_log_gets_a_progress_trail(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    code, _, err = cli("run", config, "--out", tmp_path / "run")  # the runner's stderr is no terminal
    assert code == 0, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("tiny: 2 of 2 units to do → ") and "torch thread" in lines[0]
    assert any(line.startswith("tiny: 0/2 units (0%)") for line in lines)
    assert any(line.startswith("tiny: the first unit took ") and "the 1 left take about" in line for line in lines)
    assert lines[-1].startswith("tiny: 2/2 units (100%)")


def test_log_progress_prints_at_intervals_and_says_what_is_left() -> None:
    import io

    stream = io.StringIO()
    bar = LogProgress(4, desc="job", unit="unit", initial=1, stream=stream, interval=3600)
    bar.update()  # within the interval: no line
    bar.set_postfix_str("batch 2")
    bar.interval = 0
    bar.update()
    bar.close()  # stopped at 3 of 4: says so
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("job: 1/4 units (25%), 0:00 elapsed")
    assert lines[1].startswith("job: 3/4 units (75%)") and "left" in lines[1] and lines[1].endswith("[batch 2]")
    assert len(lines) == 3 and lines[2].startswith("job: 3/4 units")


def test_threads_follow_the_idle_cores_or_the_users_choice() -> None:
    before = torch.get_num_threads()
    try:
        assert (
            idle_cores(2, 0.1) == 2 and idle_cores(2, 1.2) == 1 and idle_cores(2, 7.0) == 1 and idle_cores(8, 2.4) == 6
        )
        assert choose_threads({"OMP_NUM_THREADS": "1"}) == (1, "OMP_NUM_THREADS=1") and torch.get_num_threads() == 1
        assert choose_threads({"UNDERFIRE_THREADS": "2", "OMP_NUM_THREADS": "1"})[0] == 2
        threads, why = choose_threads({})
        assert 1 <= threads <= (os.cpu_count() or 1) and torch.get_num_threads() == threads
        assert "idle now" in why or not os.path.exists("/proc/stat")
    finally:
        torch.set_num_threads(before)


def test_idle_cores_come_from_the_per_cpu_counters_not_the_load_average() -> None:
    """Two readings of /proc/stat, written by hand: cpu0 spent 90 of 100 ticks idle or waiting for
    I/O, cpu1 none of its 100; the aggregate line and CPUs outside the set do not count."""
    before = "cpu  100 0 100 100 0 0 0 0 0 0\ncpu0 50 0 50 50 0 0 0 0 0 0\ncpu1 50 0 50 50 0 0 0 0 0 0\ncpu2 0 0 0 0 0 0 0 0 0 0\nintr 1\n"
    after = "cpu  200 0 200 300 0 0 0 0 0 0\ncpu0 55 0 55 130 10 0 0 0 0 0\ncpu1 100 0 100 50 0 0 0 0 0 0\ncpu2 0 0 0 900 0 0 0 0 0 0\n"
    assert idle_cpus(before, after, {0, 1}) == pytest.approx(0.9)
    assert idle_cpus(before, after, {0, 1, 2}) == pytest.approx(1.9)
    measured = idle_now({0}, seconds=0.05)
    assert measured is None or 0.0 <= measured <= 1.0


def test_the_report_embeds_only_files_inside_the_run_folder(finished_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(finished_run, tmp_path)
    secret = tmp_path / "secret.png"
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(secret)
    secret_bytes = secret.read_bytes()
    with sqlite3.connect(run_dir / DATABASE_NAME) as connection:
        connection.execute(
            "UPDATE results SET adversarial_path = ?, overlay_path = ? WHERE rowid = 1", (str(secret), "../secret.png")
        )
        connection.execute("UPDATE images SET image_path = ? WHERE position = 0", ("../secret.png",))
    code, out, err = cli("report", run_dir)
    assert code == 0, err
    import base64

    page = (run_dir / "report.html").read_text()
    assert base64.b64encode(secret_bytes).decode() not in page


def test_huge_images_are_refused_from_the_header_and_large_ones_decoded_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((250, 250, 3)) * 255).astype(np.uint8)).resize(
        (1600, 1200), Image.Resampling.BICUBIC
    )
    for name in ("big.jpg", "big.png"):
        photo.save(tmp_path / name, quality=95)
        small = read_image(tmp_path / name, 64)
        with Image.open(tmp_path / name) as full:  # the plain reference: full decode, then the same resize
            arr = np.asarray(full.convert("RGB"), dtype=np.float32) / 255
        reference = torch.from_numpy(image_module._resize_crop_float(arr, 64).transpose(2, 0, 1).copy())
        difference = (small - reference).abs()  # near-Nyquist noise: the worst case for a shortcut
        assert small.shape == (3, 64, 64) and difference.mean() < 0.02 and difference.max() < 0.1
    monkeypatch.setattr(image_module, "MAX_IMAGE_PIXELS", 1600 * 1200 - 1)
    with pytest.raises(
        ImageReadError, match=r"is 1600×1200 \(2 megapixels\); underfire reads images up to 2 megapixels"
    ):
        read_image(tmp_path / "big.png", 64)


def test_resizing_is_said_once_per_command(tmp_path: Path) -> None:
    for name, size in (("wide.png", (90, 70)), ("tall.png", (70, 90))):
        Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(tmp_path / name)
    code, _, err = cli("explain", tmp_path / "wide.png", tmp_path / "tall.png", "--out", tmp_path / "maps")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "resized" in notes[0] and "64×64" in notes[0]


def test_run_files_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        run_dir = tmp_path / "run"
        run_experiment(load_experiment_config(tiny_config(tmp_path)), run_dir)
    finally:
        os.umask(previous)
    written = [path for path in (run_dir / "files").rglob("*") if path.is_file()]
    assert written and all(stat.S_IMODE(path.stat().st_mode) == 0o640 for path in written)


def test_random_weights_follow_the_seed() -> None:
    first, again, other = (load_model("torchvision:resnet18@random", seed=seed) for seed in (0, 0, 1))
    assert torch.equal(first.model.fc.weight, again.model.fc.weight)
    assert not torch.equal(first.model.fc.weight, other.model.fc.weight)


def test_small_messages(tmp_path: Path) -> None:
    code, out, _ = cli("--version")
    assert code == 0 and out.strip()[0].isdigit()
    (picture,) = map(Path, picture_files(tmp_path, 1, stem="picture"))
    code, _, err = cli("explain", picture, "--out", tmp_path / "maps", "-m", tmp_path / "nope.safetensors")
    one_error_line(code, err, "nope.safetensors' does not exist")
    code, out, err = cli(
        "attack", picture, "--out", tmp_path / "one", "-a", "pgd", "--pgd-steps", "1", "--adv-steps", "0"
    )
    assert code == 0, err
    assert " on 1 image: " in out


def test_the_report_says_the_settings_and_the_iou_over_successful_attacks(finished_run: Path, tmp_path: Path) -> None:
    from underfire.report import write_report
    from underfire.report.data import summary_rows

    run_dir = copy_run(finished_run, tmp_path)
    page = write_report(run_dir, "html").read_text(encoding="utf-8")
    assert (
        "ε = 8/255 · preset quick · random target classes (never the true class) · target maps benign · seed 0" in page
    )
    assert "wall s / image" in page and "IoU, successful" in page and "colour scale from low" in page
    assert page.count('<div class="cap">predicted ') >= 2  # the benign prediction under each benign image
    with sqlite3.connect(run_dir / DATABASE_NAME) as connection:
        rows = connection.execute("SELECT iou, success FROM results WHERE attack = 'pgd'").fetchall()
    successful = [iou for iou, success in rows if success]
    (row,) = summary_rows(run_dir)
    expected = round(sum(successful) / len(successful), 3) if successful else None
    assert row["pgd_iou_success"] == expected and row["pgd_iou"] == round(sum(i for i, _ in rows) / len(rows), 3)


@pytest.mark.parametrize("command", [["train", "classifier", "--epochs", "1"], ["train", "rts", "--epochs", "1"]])
def test_training_outputs_that_are_folders_are_refused_first(tmp_path: Path, command: list[str]) -> None:
    code, _, err = cli(*command, "--out", tmp_path)
    one_error_line(code, err, "--out", "is a folder")
