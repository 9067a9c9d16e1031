"""Helpers the commands share: --normalize in front of a loaded model, the note when more images
are asked for than a split holds (issue 15, items 5 and 8)."""

from __future__ import annotations

import pytest
import torch

from pyadvk import models
from pyadvk.cli import build_parser, common
from pyadvk.nn import IMAGENET_MEAN, IMAGENET_STD, Normalize


def test_parse_normalize():
    assert common.parse_normalize(None) is None
    n = common.parse_normalize(["imagenet"])
    assert n.mean.tolist() == pytest.approx(IMAGENET_MEAN) and n.std.tolist() == pytest.approx(IMAGENET_STD)
    n = common.parse_normalize(["0.5,0.4,0.3", "0.2,0.25,0.3"])
    assert n.mean.tolist() == pytest.approx([0.5, 0.4, 0.3]) and n.std.tolist() == pytest.approx([0.2, 0.25, 0.3])
    assert common.parse_normalize(["0.5", "0.25"]).std.tolist() == [0.25]
    bad = [
        (["0.5"], "--normalize takes MEAN STD \\(or imagenet\\), got '0.5'"),
        (["1", "2", "3"], "--normalize takes MEAN STD"),
        (["0.5,x", "0.2"], "--normalize MEAN must be numbers separated by commas, got '0.5,x'"),
        (["0.5", "0"], "--normalize 0.5 0: std must be > 0"),
        (["0.5,0.5", "1,1,1"], "one value per channel each"),
    ]
    for values, message in bad:
        with pytest.raises(common.UserError, match=message):
            common.parse_normalize(values)


def test_load_model_puts_normalize_in_front_and_keeps_layer_names(tmp_path):
    torch.manual_seed(0)
    net = models.build("small_cnn", in_channels=3, input_size=8)
    models.save_model(net, tmp_path / "m.pt", "small_cnn", in_channels=3, input_size=8)
    args = build_parser().parse_args(
        ["ara", "--model", str(tmp_path / "m.pt"), "--data", "digits:8", "--normalize", "0.5,0.4,0.3", "0.2,0.25,0.3"]
    )
    model = common.load_model(args, torch.device("cpu"))
    x = torch.rand(2, 3, 8, 8)
    expected = net.eval()(Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])(x))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in net.named_modules()]
    scripted = common.normalized(torch.jit.script(net), Normalize(0.5, 0.2))
    torch.testing.assert_close(scripted(x), net((x - 0.5) / 0.2))


def test_more_images_than_the_split_holds_is_said(capsys):
    args = build_parser().parse_args(["ara", "--model", "m.pt", "--data", "digits:8", "--num-images", "1000"])
    loader, _ = common.load_data(args, n=args.num_images)
    assert len(loader.dataset) == 359
    out = capsys.readouterr().out
    assert "note: --num-images 1000 asks for more images than the test split of digits:8 has; using all 359" in out
    common.load_data(args, n=100)
    assert capsys.readouterr().out == ""
