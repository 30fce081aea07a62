import pytest

from broadface.data import celeba299_split, class_disjoint_split, lfw_pair_folds, lfw_split, read_lfw_pairs

CLASSES = [f"id{i:03d}" for i in range(50)]


def test_count_and_fraction_disjoint_and_deterministic():
    train, test = class_disjoint_split(reversed(CLASSES), num_train=20)
    assert train == CLASSES[:20] and test == CLASSES[20:]
    tr, te = class_disjoint_split(CLASSES, fraction=0.3)
    assert len(tr) == 15 and len(te) == 35 and not set(tr) & set(te)


def test_shuffle_is_seeded():
    a = class_disjoint_split(CLASSES, num_train=25, order="shuffle", seed=1)
    assert a == class_disjoint_split(list(reversed(CLASSES)), num_train=25, order="shuffle", seed=1)
    b = class_disjoint_split(CLASSES, num_train=25, order="shuffle", seed=2)
    assert a != b and sorted(a[0] + a[1]) == CLASSES and a[0] == sorted(a[0])
    with pytest.raises(ValueError, match="needs a seed"):
        class_disjoint_split(CLASSES, num_train=25, order="shuffle")


def test_numeric_order_differs_from_string_order():
    ids = ["9", "10", "100", "11"]
    assert class_disjoint_split(ids, num_train=2, order="numeric") == (["9", "10"], ["11", "100"])
    assert class_disjoint_split(ids, num_train=2, order="sorted") == (["10", "100"], ["11", "9"])
    with pytest.raises(ValueError, match="integer class names"):
        class_disjoint_split(["1", "x"], num_train=1, order="numeric")


@pytest.mark.parametrize("kw,msg", [({}, "exactly one"), ({"num_train": 2, "fraction": 0.5}, "exactly one"),
                                    ({"num_train": 0}, "non-empty"), ({"num_train": 50}, "non-empty"),
                                    ({"fraction": 1.0}, "fraction"), ({"num_train": 5, "order": "random"}, "order")])
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        class_disjoint_split(CLASSES, **kw)
    with pytest.raises(ValueError, match="duplicate"):
        class_disjoint_split(["a", "a", "b"], num_train=1)


def test_celeba299_protocol(root):
    classes = [p.name for p in (root / "celeba299" / "aligned-112x112").iterdir()]
    train, test = celeba299_split(classes)
    assert len(train) == 149 and len(test) == 150
    assert max(map(int, train)) < min(map(int, test))
    assert train == sorted(train, key=int)
    with pytest.raises(ValueError, match="299"):
        celeba299_split(classes[:-1])


@pytest.fixture(scope="module")
def pairs_txt(root):
    return root / "lfw" / "pairs.txt"


def test_lfw_folds_are_identity_disjoint(pairs_txt, lfw_dir):
    pairs = read_lfw_pairs(pairs_txt)
    assert len(pairs) == 6000 and sum(p.same for p in pairs) == 3000
    folds = lfw_pair_folds(pairs_txt)
    assert len(folds) == 10
    for k, f in enumerate(folds):
        in_fold = [p for p in pairs if p.fold == k]
        assert len(in_fold) == 600 and set(f) == {p.name1 for p in in_fold} | {p.name2 for p in in_fold}
        for other in folds[k + 1:]:
            assert not set(f) & set(other)
    for p in pairs[::200]:
        assert (lfw_dir / p.path1).is_file() and (lfw_dir / p.path2).is_file()


def test_lfw_split(pairs_txt, lfw_dir):
    classes = sorted(p.name for p in lfw_dir.iterdir())
    folds = lfw_pair_folds(pairs_txt)
    train, test = lfw_split(classes, pairs_txt, test_fold=4)
    assert test == folds[4] and not set(train) & set(test) and sorted(train + test) == classes
    train, test = lfw_split(classes, pairs_txt)
    assert set(test) == set().union(*folds) and not set(train) & set(test)
    with pytest.raises(ValueError, match="test_fold"):
        lfw_split(classes, pairs_txt, test_fold=10)
    with pytest.raises(ValueError, match="not among the classes"):
        lfw_split(classes[:100], pairs_txt, test_fold=0)


def test_pairs_file_errors(tmp_path):
    bad = tmp_path / "pairs.txt"
    bad.write_text("1\t1\nA\t1\t2\nA\t1\tB\t2\n")
    assert [p.same for p in read_lfw_pairs(bad)] == [True, False]
    bad.write_text("1\t1\nA\t1\t2\n")
    with pytest.raises(ValueError, match="found 1"):
        read_lfw_pairs(bad)
    bad.write_text("1\t1\nA\t1\tB\nA\t1\tB\t2\n")
    with pytest.raises(ValueError, match=r"pairs.txt:2: expected 'name i j'"):
        read_lfw_pairs(bad)
    bad.write_text("ten 300\n")
    with pytest.raises(ValueError, match="header"):
        read_lfw_pairs(bad)
    with pytest.raises(FileNotFoundError):
        read_lfw_pairs(tmp_path / "none.txt")
