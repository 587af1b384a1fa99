import pytest
import torch

from trainers.diffusion.unet import PRESETS, AttnBlock, build_unet, count_parameters, timestep_embedding


def test_ddpm_cifar10_preset_has_35_7M_parameters():
    # Ho et al. 2020 report 35.7M parameters for the CIFAR-10 model
    n = count_parameters(build_unet("ddpm-cifar10"))
    assert abs(n - 35.7e6) < 0.1e6, n


def test_small_and_tiny_preset_sizes():
    assert 5e6 < count_parameters(build_unet("small")) < 7e6
    assert count_parameters(build_unet("tiny")) < 0.5e6


@pytest.mark.parametrize("preset,size", [("tiny", 16), ("tiny", 32), ("small", 32)])
def test_output_shape_matches_input(preset, size):
    model = build_unet(preset, image_size=size)
    x = torch.randn(2, 3, size, size)
    assert model(x, torch.tensor([0.0, 999.0])).shape == x.shape


def test_grey_images():
    model = build_unet("tiny", image_size=16, channels=1)
    assert model(torch.randn(2, 1, 16, 16), torch.tensor([1.0, 2.0])).shape == (2, 1, 16, 16)


def test_attention_at_16x16_only_in_ddpm_preset():
    spec = PRESETS["ddpm-cifar10"]
    assert spec.attn_resolutions == (16,) and spec.ch == 128 and spec.ch_mult == (1, 2, 2, 2)
    assert spec.num_res_blocks == 2 and spec.dropout == 0.1
    model = build_unet("ddpm-cifar10")
    # 2 down blocks + 3 up blocks at 16×16, plus the middle block
    assert sum(isinstance(m, AttnBlock) for m in model.modules()) == 6


def test_timestep_embedding_is_sinusoidal():
    t = torch.tensor([0.0, 3.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 3)
    assert torch.allclose(emb[1, :4], torch.sin(3.0 * freqs), atol=1e-6)
    assert torch.allclose(emb[1, 4:], torch.cos(3.0 * freqs), atol=1e-6)
    assert torch.allclose(emb[0], torch.cat([torch.zeros(4), torch.ones(4)]))


def test_zero_initialised_output_and_second_convs():
    model = build_unet("tiny", image_size=16)
    assert torch.count_nonzero(model.conv_out.weight) == 0
    x = torch.randn(2, 3, 16, 16)
    assert torch.count_nonzero(model(x, torch.tensor([1.0, 2.0]))) == 0


def test_fused_attention_matches_explicit_attention():
    torch.manual_seed(0)
    block = AttnBlock(16, groups=8)
    torch.nn.init.normal_(block.proj.weight)
    x = torch.randn(2, 16, 4, 4)
    explicit = block(x)
    block.fused = True
    assert torch.allclose(block(x), explicit, atol=1e-5)


def test_explicit_attention_supports_double_backward():
    torch.manual_seed(0)
    model = build_unet("tiny", image_size=16)
    for p in model.parameters():  # leave the zero init so every path carries gradient
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, 16, 16)
    params = list(model.parameters())
    loss = model(x, torch.tensor([1.0, 500.0])).pow(2).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    hv = torch.autograd.grad(sum((g * vi).sum() for g, vi in zip(grads, v)), params)
    assert all(torch.isfinite(h).all() for h in hv)
    assert sum(h.abs().sum() for h in hv) > 0
