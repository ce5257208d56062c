"""The data module on the real Fashion-MNIST: splits, verification, batches, sharding."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch

from fmnist_lightning.data import NUM_CLASSES, Augment, FashionMNISTDataModule, TensorBatches
from fmnist_lightning.errors import DataError
from fmnist_lightning.settings import DataSettings
from fmnist_lightning.sources import FILES, SYSTEM_DATA_DIR, load_fashion_mnist, locate
from tests.helpers import is_png


def official_train_image(i: int) -> torch.Tensor:
    """Image i of the official training file, read straight from the IDX bytes."""
    paths, _ = locate(Path("data"), offline=True)
    raw = paths["train_images"].read_bytes()
    content = gzip.decompress(raw) if paths["train_images"].suffix == ".gz" else raw
    start = 16 + 784 * i
    return torch.tensor(list(content[start : start + 784]), dtype=torch.uint8).reshape(28, 28)


def test_split_sizes(datamodule: FashionMNISTDataModule) -> None:
    assert [len(datamodule.split(s)[0]) for s in ("train", "val", "test")] == [55000, 5000, 10000]
    assert [len(datamodule.split(s)[1]) for s in ("train", "val", "test")] == [55000, 5000, 10000]


def test_validation_is_first_5000_of_official_training_file(datamodule: FashionMNISTDataModule) -> None:
    assert torch.equal(datamodule.split("val")[0][0], official_train_image(0))
    assert torch.equal(datamodule.split("val")[0][4999], official_train_image(4999))
    assert torch.equal(datamodule.split("train")[0][0], official_train_image(5000))


def test_test_set_has_1000_per_class(datamodule: FashionMNISTDataModule) -> None:
    assert datamodule.split("test")[1].bincount(minlength=NUM_CLASSES).tolist() == [1000] * NUM_CLASSES


def test_val_size_keeps_first_n_convention(real_data: None) -> None:
    dm = FashionMNISTDataModule.from_settings(DataSettings(offline=True, val_size=1000), eval_batch_size=250)
    dm.setup()
    assert len(dm.split("val")[0]) == 1000 and len(dm.split("train")[0]) == 59000
    assert torch.equal(dm.split("train")[0][0], official_train_image(1000))


def test_batches_are_unit_range_with_one_hot_targets(datamodule: FashionMNISTDataModule) -> None:
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.images.shape == (128, 1, 28, 28) and batch.images.dtype == torch.float32
    assert float(batch.images.min()) >= 0.0 and float(batch.images.max()) <= 1.0
    assert batch.targets.shape == (128, NUM_CLASSES)
    assert torch.allclose(batch.targets.sum(dim=1), torch.ones(128))
    assert torch.equal(batch.targets.argmax(dim=1), batch.labels)


def test_label_smoothing_keeps_argmax_and_sums_to_one() -> None:
    from fmnist_lightning.data import one_hot

    labels = torch.tensor([0, 3, 9])
    t = one_hot(labels, smoothing=0.1)
    assert torch.allclose(t.sum(dim=1), torch.ones(3))
    assert torch.equal(t.argmax(dim=1), labels)
    assert t[0, 0] == pytest.approx(0.91) and t[0, 1] == pytest.approx(0.01)


def test_eval_batches_cover_each_image_once_including_last_partial_batch() -> None:
    images, labels = synthetic(10000)
    batches = list(TensorBatches(images, labels, batch_size=768))
    assert len(batches) == 14 and len(batches[-1].labels) == 10000 - 13 * 768
    assert torch.equal(torch.cat([b.indices for b in batches]), torch.arange(10000))


def synthetic(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images and labels: batcher logic needs no real data."""
    gen = torch.Generator().manual_seed(n)
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen), torch.randint(
        0, 10, (n,), generator=gen
    )


def _order(batches: TensorBatches, epoch: int) -> torch.Tensor:
    batches.set_epoch(epoch)
    return torch.cat([b.indices for b in batches])


def test_shuffle_is_seeded_per_epoch() -> None:
    images, labels = synthetic(55000)
    a = TensorBatches(images, labels, 128, shuffle=True, seed=7)
    b = TensorBatches(images, labels, 128, shuffle=True, seed=7)
    c = TensorBatches(images, labels, 128, shuffle=True, seed=8)
    assert torch.equal(_order(a, 0), _order(b, 0))
    assert not torch.equal(_order(a, 0), _order(a, 1))
    assert not torch.equal(_order(a, 0), _order(c, 0))
    assert torch.equal(_order(a, 3).sort().values, torch.arange(55000))


def test_ddp_shards_are_disjoint_and_cover_the_epoch() -> None:
    images, labels = synthetic(55000)
    shards = [
        _order(TensorBatches(images, labels, 128, shuffle=True, seed=1, rank=r, world_size=2, even_shards=True), 2)
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 27500
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(55000))


def test_eval_shards_use_every_sample_exactly_once_even_when_uneven() -> None:
    images, labels = synthetic(10000)
    shards = [
        torch.cat([b.indices for b in TensorBatches(images, labels, 1000, rank=r, world_size=3)]) for r in range(3)
    ]
    assert sorted(len(s) for s in shards) == [3333, 3333, 3334]
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(10000))


def test_resume_mid_epoch_continues_with_the_next_batch() -> None:
    images, labels = synthetic(55000)
    full = TensorBatches(images, labels, 1000, shuffle=True, seed=3)
    full.set_epoch(2)
    expected = [b.indices for b in full]
    first = TensorBatches(images, labels, 1000, shuffle=True, seed=3)
    first.set_epoch(2)
    iterator = iter(first)
    seen = [next(iterator).indices for _ in range(7)]
    resumed = TensorBatches(images, labels, 1000, shuffle=True, seed=3)
    resumed.restore(first.position())
    resumed.set_epoch(2)  # Lightning calls this again at the restart; it must not lose the position
    rest = [b.indices for b in resumed]
    assert len(seen) + len(rest) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, expected))


def test_augmentation_is_deterministic_and_keeps_shape() -> None:
    images, labels = synthetic(55000)
    aug = Augment(translate=2, hflip=True, erase_p=0.5)
    a = TensorBatches(images, labels, 256, shuffle=True, seed=5, augment=aug)
    b = TensorBatches(images, labels, 256, shuffle=True, seed=5, augment=aug)
    plain = TensorBatches(images, labels, 256, shuffle=True, seed=5)
    xa, xb, xp = next(iter(a)).images, next(iter(b)).images, next(iter(plain)).images
    assert xa.shape == xp.shape == (256, 1, 28, 28)
    assert torch.equal(xa, xb)
    assert not torch.equal(xa, xp)
    assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0


def test_translate_moves_content_by_at_most_two_pixels() -> None:
    from fmnist_lightning.data import random_translate

    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 14, 14] = 1.0
    moved = random_translate(x, 2, torch.Generator().manual_seed(0))
    ys, xs = (moved[:, 0] == 1.0).nonzero()[:, 1], (moved[:, 0] == 1.0).nonzero()[:, 2]
    assert len(ys) == 64  # every image keeps its pixel
    assert int((ys - 14).abs().max()) <= 2 and int((xs - 14).abs().max()) <= 2
    assert len(set(zip(ys.tolist(), xs.tolist()))) > 5


# --- verification of the files ------------------------------------------------------------------


@pytest.fixture
def data_copy(real_data: None, tmp_path: Path) -> Path:
    """The four files copied (gzipped) into a folder the test may damage."""
    paths, _ = locate(Path("data"), offline=True)
    for key, path in paths.items():
        target = tmp_path / (FILES[key].name + ".gz")
        if path.suffix == ".gz":
            shutil.copy(path, target)
        else:
            target.write_bytes(gzip.compress(path.read_bytes()))
    return tmp_path


def test_local_copy_is_preferred_and_verified(data_copy: Path) -> None:
    data = load_fashion_mnist(data_copy, offline=True)
    assert str(data_copy) in data.source
    assert data.train_images.shape == (60000, 28, 28)


def test_uncompressed_torchvision_layout_is_found(data_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("tv")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for spec in FILES.values():
        (raw / spec.name).write_bytes(gzip.decompress((data_copy / f"{spec.name}.gz").read_bytes()))
    assert load_fashion_mnist(root, offline=True).test_labels.shape == (10000,)


def test_truncated_file_is_refused(data_copy: Path) -> None:
    path = data_copy / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is a truncated or corrupt"):
        load_fashion_mnist(data_copy, offline=True)


def test_flipped_byte_is_refused(data_copy: Path) -> None:
    path = data_copy / "train-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(path.read_bytes()))
    content[100] ^= 0x01
    path.write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(DataError, match="fails its checksum.*expected"):
        load_fashion_mnist(data_copy, offline=True)


def test_missing_data_offline_lists_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="looked in .*--offline forbids downloading"):
        locate(tmp_path / "nothing", offline=True, system_dir=tmp_path / "no-system")


def test_cli_reports_corrupt_file_in_one_line(data_copy: Path, cli) -> None:
    path = data_copy / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])
    code, out, err = cli("data", "--data-dir", data_copy, "--offline", "--out", data_copy / "out")
    assert code == 1
    assert "t10k-images-idx3-ubyte.gz" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1


def test_data_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    from fmnist_lightning.sources import _download

    file = tmp_path / "afile"
    file.write_text("x")
    with pytest.raises(DataError, match="is a file"):
        _download(file)


@pytest.mark.skipif(not SYSTEM_DATA_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_fmnist_data_command(cli, tmp_path: Path) -> None:
    code, out, err = cli("data", "--offline", "--data-dir", tmp_path / "empty", "--out", tmp_path)
    assert code == 0, err
    assert "(55000, 28, 28, 1)" in out and "(55000, 10)" in out
    assert "(5000, 28, 28, 1)" in out and "(10000, 28, 28, 1)" in out
    assert "system copy" in out + err
    assert is_png(tmp_path / "samples.png")


def test_summary_of_the_splits(datamodule) -> None:
    from fmnist_lightning.data import first_of_each_class, summarize

    summary = summarize(datamodule)
    assert summary["val"].images_shape == (5000, 28, 28, 1) and summary["val"].targets_shape == (5000, 10)
    assert summary["test"].per_class == [1000] * 10
    # Validation is the first 5,000 of the official training file: with train, 6,000 of each class.
    assert [a + b for a, b in zip(summary["train"].per_class, summary["val"].per_class)] == [6000] * 10
    assert (summary["train"].pixel_min, summary["train"].pixel_max) == (0.0, 1.0)
    labels = datamodule.split("train")[1]
    first = first_of_each_class(labels)
    assert labels[first].tolist() == list(range(10))
    assert all(int(labels[:i].eq(k).sum()) == 0 for k, i in enumerate(first))
