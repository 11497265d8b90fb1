"""The results store: real SQLite files and real PNG/.npy files in a temporary folder."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from underfire.errors import InputError
from underfire.store import (
    ImageRecord,
    ResultRecord,
    ResultStore,
    TransferRecord,
    remove_temporary_files,
    run_lock,
    save_npy_atomic,
    save_png_atomic,
    write_atomic,
)
from underfire.store.database import SCHEMA, SCHEMA_VERSION
from underfire.store.files import TEMP_MARK

COLUMNS = {
    "meta": ["key", "value"],
    "images": ["model", "image", "position", "true_class", "target_class", "image_path"],
    "results": [
        "model",
        "interpreter",
        "attack",
        "target_map",
        "image",
        "true_class",
        "target_class",
        "predicted_class",
        "success",
        "confidence",
        "l1",
        "l2",
        "iou",
        "iou_by_k",
        "top_k_intersection",
        "spearman",
        "linf",
        "adversarial_path",
        "map_path",
        "overlay_path",
        "benign_map_path",
        "benign_overlay_path",
        "seconds",
        "seed",
        "config",
        "interpreter_options",
    ],
    "transfer": [
        "model",
        "source_interpreter",
        "target_interpreter",
        "target_map",
        "image",
        "l1",
        "l2",
        "iou",
        "attack",
    ],
}
PRIMARY_KEYS = {
    "meta": ["key"],
    "images": ["model", "image"],
    "results": ["model", "interpreter", "attack", "target_map", "image"],
    "transfer": ["model", "attack", "source_interpreter", "target_interpreter", "target_map", "image"],
}


def result(image: str = "test-00000", interpreter: str = "cam") -> ResultRecord:
    return ResultRecord(
        model="shapes-resnet",
        interpreter=interpreter,
        attack="adv2",
        target_map="benign",
        image=image,
        true_class=1,
        target_class=2,
        predicted_class=2,
        success=True,
        confidence=0.9,
        l1=0.1,
        l2=0.2,
        iou=0.7,
        iou_by_k={"0.05": 0.5, "0.50": 0.9},
        top_k_intersection=0.6,
        spearman=0.8,
        linf=8 / 255,
        adversarial_path="files/a.png",
        map_path="files/a.npy",
        overlay_path="files/a.o.png",
        benign_map_path="files/b.npy",
        benign_overlay_path="files/b.png",
        seconds=1.5,
        seed=0,
        config="{}",
    )


def transfer(image: str = "test-00000", target: str = "grad") -> TransferRecord:
    return TransferRecord("shapes-resnet", "cam", target, "benign", image, 0.1, 0.2, 0.3)


def test_schema_is_the_contract(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        for table, columns in COLUMNS.items():
            info = store.connection.execute(f"PRAGMA table_info({table})").fetchall()
            assert [row[1] for row in info] == columns
            assert all(row[3] == 1 for row in info if (table, row[1]) != ("meta", "key"))  # NOT NULL
            keys = sorted((row[5], row[1]) for row in info if row[5] > 0)
            assert [name for _, name in keys] == PRIMARY_KEYS[table]
        assert store.connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert (tmp_path / "results.sqlite").is_file()


def test_rows_round_trip_with_json_and_booleans(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        store.insert_images([ImageRecord("shapes-resnet", "test-00000", 0, 1, 2, "files/i.png")])
        store.insert_unit([result()], [transfer()])
        (row,) = store.rows("results")
        assert row["success"] == 1 and row["iou_by_k"] == {"0.05": 0.5, "0.50": 0.9}
        raw = store.connection.execute("SELECT iou_by_k FROM results").fetchone()[0]
        assert json.loads(raw) == {"0.05": 0.5, "0.50": 0.9}
        assert store.images("shapes-resnet") == [ImageRecord("shapes-resnet", "test-00000", 0, 1, 2, "files/i.png")]
        assert store.result_keys() == {("shapes-resnet", "cam", "adv2", "benign", "test-00000")}
        assert store.transfer_keys() == {("shapes-resnet", "cam", "grad", "benign", "test-00000", "adv2")}


def test_a_unit_lands_whole_or_not_at_all(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        store.insert_unit([result("test-00000")], [transfer("test-00000")])
        # a duplicate anywhere in a unit is a bug: the whole unit is refused, nothing is replaced
        with pytest.raises(sqlite3.IntegrityError):
            store.insert_unit([result("test-00001")], [transfer("test-00002"), transfer("test-00000")])
        assert store.count("results") == 1 and store.count("transfer") == 1
        store.insert_unit([result("test-00001")], [transfer("test-00001")])
        assert store.count("results") == 2 and store.count("transfer") == 2


def test_config_is_claimed_once_and_a_different_one_refused(tmp_path: Path) -> None:
    config = {"experiment": {"images": 4, "models": ["shapes-resnet"]}, "overrides": {}}
    versions = {"underfire": "0", "torch": "0", "python": "3", "numpy": "1", "platform": "x"}
    with ResultStore(tmp_path) as store:
        assert store.claim(config, versions, "2024-01-01T00:00:00+00:00") is True
        assert store.claim(config, versions, "later") is False
        meta = store.meta()
        assert json.loads(meta["config"]) == config and json.loads(meta["versions"]) == versions
        assert meta["created"] == "2024-01-01T00:00:00+00:00"
        changed = {"experiment": {"images": 8, "models": ["shapes-resnet"]}, "overrides": {}}
        with pytest.raises(InputError, match=r"experiment\.images: 4 → 8") as error:
            store.claim(changed, versions, "later")
        assert "\n" not in str(error.value)


def test_atomic_writes_leave_whole_files_or_the_old_ones(tmp_path: Path) -> None:
    picture = np.zeros((4, 5, 3), np.uint8)
    picture[1, 2] = (255, 0, 7)
    png = save_png_atomic(picture, tmp_path / "sub" / "a.png", scale=2)
    with Image.open(png) as image:
        image.load()
        assert image.size == (10, 8) and image.getpixel((4, 2)) == (255, 0, 7)
    npy = save_npy_atomic(np.arange(6, dtype=np.float32).reshape(2, 3), tmp_path / "a.npy")
    assert np.load(npy).tolist() == [[0, 1, 2], [3, 4, 5]]

    def crash(stream: object) -> None:
        stream.write(b"half a file")  # type: ignore[attr-defined]
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_atomic(npy, crash)
    assert np.load(npy).tolist() == [[0, 1, 2], [3, 4, 5]]  # the old file, whole
    assert not list(tmp_path.rglob(f"*{TEMP_MARK}*"))


def test_temporary_files_of_a_killed_process_are_removed(tmp_path: Path) -> None:
    (tmp_path / "files" / "m").mkdir(parents=True)
    left = tmp_path / "files" / "m" / f".a.png{TEMP_MARK}x1y2"
    left.write_bytes(b"partial")
    kept = tmp_path / "files" / "m" / "a.png"
    kept.write_bytes(b"whole")
    assert remove_temporary_files(tmp_path) == 1
    assert not left.exists() and kept.exists()


def test_one_process_per_run_folder(tmp_path: Path) -> None:
    with run_lock(tmp_path):
        with pytest.raises(InputError, match="in use by another underfire process"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released on exit
        pass


def test_changed_attack_settings_are_refused_too(tmp_path: Path) -> None:
    config = {"experiment": {"preset": "quick"}}
    with ResultStore(tmp_path) as store:
        store.claim(config, {}, "now", {"cam": {"adv_steps": 120}})
        assert json.loads(store.meta()["attack_configs"]) == {"cam": {"adv_steps": 120}}
        assert store.claim(config, {}, "now", {"cam": {"adv_steps": 120}}) is False
        with pytest.raises(InputError, match=r"did the preset change\?\) \(cam\.adv_steps: 120 → 200\)"):
            store.claim(config, {}, "now", {"cam": {"adv_steps": 200}})


def test_a_setting_added_since_the_run_was_recorded_passes_only_at_its_default(tmp_path: Path) -> None:
    """A run folder from a version before ``restarts`` existed: the same settings plus ``restarts``
    at its default are the same run; ``restarts`` at 2 (a preset that moved) is refused."""
    config = {"experiment": {"preset": "quick"}}
    defaults = {"adv2": {"lrp": {"adv_steps": 200, "restarts": 1}}}
    with ResultStore(tmp_path) as store:
        store.claim(config, {}, "then", {"adv2": {"lrp": {"adv_steps": 1000}}})
        assert store.claim(config, {}, "now", {"adv2": {"lrp": {"adv_steps": 1000, "restarts": 1}}}, defaults) is False
        with pytest.raises(InputError, match=r"\(adv2\.lrp\.restarts: null → 2\)"):
            store.claim(config, {}, "now", {"adv2": {"lrp": {"adv_steps": 1000, "restarts": 2}}}, defaults)
        with pytest.raises(
            InputError, match=r"\(adv2\.lrp\.restarts: null → 1\)"
        ):  # without defaults: any new key is a change
            store.claim(config, {}, "now", {"adv2": {"lrp": {"adv_steps": 1000, "restarts": 1}}})
        with pytest.raises(
            InputError, match=r"adv2\.lrp\.adv_steps: 1000 → 200"
        ):  # a stored setting at another value, default or not
            store.claim(config, {}, "now", {"adv2": {"lrp": {"adv_steps": 200, "restarts": 1}}}, defaults)


def test_a_version_1_database_is_migrated_and_a_newer_one_refused(tmp_path: Path) -> None:
    """A database written before schema version 2 (no interpreter options, no transfer attack) gets
    the new columns with their defaults and keeps its rows; a version from the future is refused."""
    import sqlite3

    old = tmp_path / "old"
    old.mkdir()
    connection = sqlite3.connect(old / "results.sqlite")
    version_1 = SCHEMA.replace("  interpreter_options TEXT NOT NULL DEFAULT '{}',\n", "").replace(
        "  attack TEXT NOT NULL DEFAULT 'adv2',\n", ""
    )
    version_1 = version_1.replace(
        "PRIMARY KEY (model, attack, source_interpreter", "PRIMARY KEY (model, source_interpreter"
    )
    assert "interpreter_options" not in version_1 and "attack TEXT NOT NULL DEFAULT" not in version_1
    connection.executescript(version_1)
    connection.execute("INSERT INTO transfer VALUES ('m', 'cam', 'grad', 'benign', 'x', 0.1, 0.2, 0.3)")
    connection.commit()
    connection.close()
    with ResultStore(old) as store:
        assert store.connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert store.transfer_keys() == {("m", "cam", "grad", "benign", "x", "adv2")}
        store.insert_unit([result("y")])
        assert store.rows("results")[0]["interpreter_options"] == "{}"
    future = tmp_path / "future"
    future.mkdir()
    connection = sqlite3.connect(future / "results.sqlite")
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    with pytest.raises(InputError, match="schema version"):
        ResultStore(future)
