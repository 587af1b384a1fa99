"""bench/batched_products.py: its written-out GroupNorm is GroupNorm, and its
vmapped block products equal the probe's column-by-column ones (CPU)."""
import torch
import torch.nn as nn


def test_written_out_group_norm_equals_torchs():
    from bench.batched_products import written_out_group_norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.GroupNorm(2, 8))
    for m in model:
        if isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    x = torch.randn(5, 3, 6, 6)
    ref = model(x)
    with written_out_group_norm(model) as switched:
        assert switched == 2
        out = model(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert all("forward" not in m.__dict__ for m in model)   # restored


def test_batched_products_equal_the_probes_columns(capsys):
    from bench import batched_products

    rows = batched_products.main(["--preset", "tiny", "--batch", "2", "--image-size", "8", "--device", "cpu",
                                  "--pretrain", "2", "--reps", "1", "--blocks", "1,3"])
    out = capsys.readouterr().out
    assert [r["k"] for r in rows] == [1, 3]
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["eager_ms"] > 0 and r["rel_diff"] < 1e-5
    assert "per column ÷ the probe's" in out and "float32 products" in out
