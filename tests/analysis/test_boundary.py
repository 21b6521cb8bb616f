"""The boundary-layer rule on synthetic dH_FFN profiles, edge cases, table input and the config line."""

from __future__ import annotations

import pandas as pd
import pytest

from verl_ext.analysis import find_boundary_layer


def _qwen3_like():
    """36 layers: exploration 1..6, integration ~0 (noise) 7..30, convergence 31..36."""
    return (
        [0.8, 1.2, 0.9, 0.6, 0.4, 0.2]
        + [-0.01, 0.004, -0.003, 0.0] * 6
        + [-0.3, -0.5, -0.8, -1.0, -1.5, -2.0]
    )


def test_qwen3_like_profile():
    r = find_boundary_layer(_qwen3_like())
    assert (r.layer, r.layer_index, r.run) == (6, 5, (1, 6))
    assert r.warning is None
    assert r.config_line() == "bupo.internal_layer=5  # 0-based decoder index (paper layer 6)"
    assert (
        r.phases[:6] == ["exploration"] * 6 and r.phases[6] == "convergence" and r.phases[-1] == "convergence"
    )
    ev = r.evidence()
    assert "layers 1..6" in ev and "<- boundary" in ev and ev.count("\n  l=") == 36


@pytest.mark.parametrize("L,expected", [(28, 27), (32, 31)])
def test_llama_like_abrupt_convergence(L, expected):
    d = [0.05 + 0.01 * i for i in range(L - 1)] + [-3.0]
    r = find_boundary_layer(d)
    assert (r.layer, r.layer_index) == (expected, expected - 1)
    assert r.config_line().startswith(f"bupo.internal_layer={expected - 1}  #")


def test_never_positive():
    r = find_boundary_layer([-0.1, 0.0, -0.2, -1.0])
    assert r.layer is None and r.layer_index is None and r.run is None
    assert "never explores" in r.explanation
    assert r.config_line().startswith("#")
    # within the tolerance counts as integration, not exploration
    assert find_boundary_layer([0.01, 0.02, -0.5], eps=0.05).layer is None


def test_positive_to_the_end():
    r = find_boundary_layer([0.3, 0.2, 0.1, 0.05])
    assert r.layer == 4 and r.layer_index == 3
    assert r.warning and "last layer" in r.warning
    assert "WARNING" in r.evidence()


def test_run_may_start_late_and_only_first_run_counts():
    r = find_boundary_layer([-0.2, 0.0, 0.5, 0.4, -0.1, 0.7, 0.6, -1.0])
    assert (r.layer, r.run) == (4, (3, 4))
    assert r.phases[:2] == ["convergence", "integration"]


def test_eps_tolerance():
    d = [0.5, 0.3, 0.01, -0.02, -0.5]
    assert find_boundary_layer(d).layer == 3  # literal "> 0"
    assert find_boundary_layer(d, eps=0.02).layer == 2  # 0.01 is ~0: integration
    assert find_boundary_layer(d, eps=0.02).phases == [
        "exploration",
        "exploration",
        "integration",
        "integration",
        "convergence",
    ]


def test_table_input_and_errors():
    d = [0.4, 0.1, -0.2]
    rows = [
        dict(layer=lay, module=m, delta=(d[lay - 1] if m == "ffn" else 9.0), convention="raw")
        for m in ("layer", "attn", "ffn")
        for lay in (3, 1, 2)
    ]
    df = pd.DataFrame(rows)
    r = find_boundary_layer(df, label="m")
    assert r.layer == 2 and r.label == "m" and r.to_dict()["config_line"].startswith("bupo.internal_layer=1")
    two = pd.concat([df.assign(label="a"), df.assign(label="b")])
    with pytest.raises(ValueError, match="several label"):
        find_boundary_layer(two)
    with pytest.raises(ValueError, match="no 'ffn' rows"):
        find_boundary_layer(df[df.module != "ffn"])
    with pytest.raises(ValueError, match="empty"):
        find_boundary_layer([])
    with pytest.raises(ValueError, match="NaN"):
        find_boundary_layer([0.1, float("nan")])
    with pytest.raises(ValueError, match="eps"):
        find_boundary_layer([0.1], eps=-1)


def test_flat_metrics_input_is_the_same_rule():
    """The training telemetry's flat metrics (``<prefix>/delta_ffn/<l>``) give what the sequence gives."""
    d = _qwen3_like()
    metrics = {f"bupo/delta_ffn/{l}": x for l, x in enumerate(d, start=1)}  # noqa: E741
    metrics.update({f"bupo/ffn_entropy/{l}": 5.0 for l in range(1, 37)})  # noqa: E741
    r = find_boundary_layer(dict(reversed(list(metrics.items()))))  # key order does not matter
    assert (r.layer_index, r.delta_ffn) == (5, d)
    with pytest.raises(ValueError, match="several prefixes"):
        find_boundary_layer({"a/delta_ffn/1": 0.1, "b/delta_ffn/2": 0.1})
    with pytest.raises(ValueError, match=r"1\.\.L once each"):
        find_boundary_layer({"bupo/delta_ffn/1": 0.1, "bupo/delta_ffn/3": -0.1})
    with pytest.raises(ValueError, match="no '<prefix>/delta_ffn/<l>'"):
        find_boundary_layer({})


def test_cli_and_auto_share_the_tolerance():
    from verl_ext.analysis.boundary import DEFAULT_EPS
    from verl_ext.analysis.cli import build_parser

    args = build_parser().parse_args(["--model", "m", "--data", "d", "--out", "o"])
    assert args.eps == DEFAULT_EPS == 0.0
