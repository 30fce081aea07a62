import json

from broadface.cli.main import main
from broadface.data import RecordIODataset, read_lfw_pairs, write_bin
from broadface.data.binfile import lfw_bin_images

from tests.helpers import NAMES


def test_pack_and_info(small_folder, tmp_path, capsys):
    out = tmp_path / "rec"
    assert main(["data", "pack", str(small_folder), str(out)]) == 0
    assert "9 images, 3 classes, property 3,112,112" in capsys.readouterr().out
    assert len(RecordIODataset(out)) == 9
    assert main(["data", "pack", str(small_folder), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    (small_folder / NAMES[0] / "bad.jpg").write_bytes(b"nope")
    assert main(["data", "pack", str(small_folder), str(out), "--overwrite"]) == 2
    assert "bad.jpg: cannot decode image" in capsys.readouterr().err
    assert main(["data", "pack", str(small_folder), str(out), "--overwrite", "--skip-bad"]) == 0
    assert "skipped 1 undecodable" in capsys.readouterr().out
    assert main(["data", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["classes"], info["images"], info["property"]) == (3, 9, [3, 112, 112])
    assert info["per_class"] == {"min": 3, "median": 3.0, "max": 3}
    assert main(["data", "info", str(small_folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["classes"], info["images"]) == (3, 10)  # the folder still holds bad.jpg
    assert info["per_class"] == {"min": 3, "median": 3.0, "max": 4}
    assert main(["data", "info", str(small_folder), "--check"]) == 0
    text = capsys.readouterr().out
    assert "unreadable 1" in text and "bad.jpg" in text


def test_info_named_and_bin(root, lfw_dir, tmp_path, capsys):
    assert main(["data", "info", "celeba299", "--split", "test", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["classes"], info["per_class"]["min"]) == (150, 2)
    pairs = read_lfw_pairs(root / "lfw" / "pairs.txt")[295:305]
    write_bin(tmp_path / "p.bin", *lfw_bin_images(pairs, lfw_dir))
    assert main(["data", "info", str(tmp_path / "p.bin")]) == 0
    text = capsys.readouterr().out
    assert "pairs      10" in text and "same       5" in text and "images     20" in text


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("broadface data: error:") and "nowhere" in err and "Traceback" not in err
    assert main(["data", "info", str(tmp_path), "--split", "train"]) == 2
    assert "--split applies to named sets" in capsys.readouterr().err
    assert main(["data"]) == 0 and "ACTION" in capsys.readouterr().out
