"""Saved training state: the codec round trip (no pickles), damaged states ignored, resumable batch streams."""

import random

import torch

from sophon.data import ImageSet
from sophon.io import read_state, write_state
from sophon.train import BatchStream


def test_state_round_trip_keeps_types_and_tensors(tmp_path):
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": random.Random(3).getstate(), "loop": 7, "name": "x",
             "nan": float("nan"), "nothing": None, "rng_torch": torch.get_rng_state()}
    write_state(tmp_path, state)
    back = read_state(tmp_path)
    assert back["loop"] == 7 and back["name"] == "x" and back["nothing"] is None and back["nan"] != back["nan"]
    assert list(back["optimizer"]["state"]) == [0]  # int keys stay ints
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    restored = random.Random()
    restored.setstate(back["rng"])  # tuples stay tuples
    assert restored.random() == random.Random(3).random()
    assert torch.equal(back["rng_torch"], state["rng_torch"])
    assert [p.name for p in tmp_path.iterdir()] and not any(p.suffix == ".pt" for p in tmp_path.iterdir())

    write_state(tmp_path, {"loop": 8})  # the next state replaces the previous one's tensor file
    assert read_state(tmp_path) == {"loop": 8} and len(list(tmp_path.glob("state-*.safetensors"))) == 1


def test_damaged_or_missing_state_reads_as_none(tmp_path):
    assert read_state(tmp_path / "nothing") is None
    write_state(tmp_path, {"w": torch.ones(4)})
    tensors = next(tmp_path.glob("state-*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-4] + b"\0\0\0\0")
    assert read_state(tmp_path) is None


def test_batch_stream_resumes_where_it_stopped():
    data = ImageSet(torch.arange(10 * 4, dtype=torch.uint8).reshape(10, 1, 2, 2), torch.arange(10), tuple("0123456789"))
    full = BatchStream(data, 3, torch.Generator().manual_seed(0))
    expected = [next(full)[1].tolist() for _ in range(7)]
    assert all(len(batch) == 3 for batch in expected)  # full batches only: 3 per epoch of 10

    generator = torch.Generator().manual_seed(0)
    first = BatchStream(data, 3, generator)
    seen = [next(first)[1].tolist() for _ in range(4)]
    saved, generator_state = first.state(), generator.get_state()
    generator2 = torch.Generator()
    generator2.set_state(generator_state)
    second = BatchStream(data, 3, generator2)
    second.restore(saved)
    assert seen + [next(second)[1].tolist() for _ in range(3)] == expected
