import pickle

import numpy as np
import pytest

from broadface.data import UnsafePickleError, load_bin, read_lfw_pairs, write_bin
from broadface.data.binfile import decode_bin_images, lfw_bin_images


@pytest.fixture(scope="module")
def lfw_pairs(root):
    pairs = read_lfw_pairs(root / "lfw" / "pairs.txt")
    return pairs[:5] + pairs[300:305]  # 5 matched + 5 mismatched of fold 0


def test_roundtrip_from_real_lfw_pairs(lfw_pairs, lfw_dir, tmp_path):
    images, issame = lfw_bin_images(lfw_pairs, lfw_dir)
    for protocol in (2, 4, 5):
        path = write_bin(tmp_path / f"lfw{protocol}.bin", images, issame, protocol=protocol)
        got_images, got_same = load_bin(path)
        assert got_images == images and got_same.dtype == bool and got_same.tolist() == [True] * 5 + [False] * 5
    assert got_images[0] == (lfw_dir / lfw_pairs[0].path1).read_bytes()
    decoded = decode_bin_images(got_images, path)
    assert len(decoded) == 20 and decoded[3].size == (112, 112) and decoded[3].mode == "RGB"


def test_python2_pickle_loads(tmp_path):
    # What Python 2's pickle.dump(([b'ab', b'cd'], [True]), f, protocol=2) writes: str -> SHORT_BINSTRING
    py2 = b"\x80\x02]q\x00(U\x02abq\x01U\x02cdq\x02e]q\x03\x88a\x86q\x04."
    (tmp_path / "py2.bin").write_bytes(py2)
    images, issame = load_bin(tmp_path / "py2.bin")
    assert images == [b"ab", b"cd"] and issame.tolist() == [True]


class Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.target}",)


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([Exploit(marker)], []), protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"evil.bin: unsafe pickle, refuses global (posix|os)\.system"):
        load_bin(path)
    assert not marker.exists()
    # sanity: the same file really would run the command under plain pickle
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_other_globals_and_bad_structures(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load_bin(path)
    path.write_bytes(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")
    with pytest.raises(ValueError, match="latin1"):
        load_bin(path)
    for obj, msg in [({"a": 1}, "pair"), ([[b"a"], [True]], "exactly 2 per pair"), ([["a", "b"], [True]], "bytes"),
                     ([[b"a", b"b"], [2]], "booleans")]:
        path.write_bytes(pickle.dumps(obj, protocol=4))
        with pytest.raises(ValueError, match=msg):
            load_bin(path)
    path.write_bytes(b"\x80\x04truncated")
    with pytest.raises(ValueError, match="not a readable pickle"):
        load_bin(path)
    with pytest.raises(FileNotFoundError):
        load_bin(tmp_path / "none.bin")
    with pytest.raises(ValueError, match="2 per pair"):
        write_bin(path, [b"a"], [True])
    assert isinstance(load_bin(write_bin(path, [b"a", b"b"], np.array([False])))[1], np.ndarray)
