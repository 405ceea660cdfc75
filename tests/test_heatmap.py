"""The heat map's colour scale: per method, the 95th percentile of |credit| over its response tokens, with the
tokens beyond it clipped, outlined and their exact value on hover."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
import torch
from factories import make_rollouts

from creditrl.credit import CreditMaps
from creditrl.report.heatmap import SCALE_QUANTILE, method_scale, render_heatmap

SMALL = [0.01, -0.02, 0.03, -0.04, 0.05] * 8  # 40 tokens
OUTLIER = 100 * max(abs(x) for x in SMALL)


def _maps() -> CreditMaps:
    """One method on two responses: 40 small credits and an outlier 100× larger, then 10 small credits
    and a huge value on a padding token (which must not count)."""
    rollouts = make_rollouts(rewards=[1.0, 0.0], group_ids=[0, 0], lengths=[41, 10])
    credit = torch.zeros(2, 41, dtype=torch.float64)
    credit[0] = torch.tensor(SMALL + [OUTLIER], dtype=torch.float64)
    credit[1, :10] = torch.tensor(SMALL[:10], dtype=torch.float64)
    credit[1, 20] = 1e6
    return CreditMaps(rollouts, ["1+1"], [[f"x{t}" for t in range(41)]] * 2, {"m": credit}, {"m": "test"}, {})


def _page() -> tuple[str, float]:
    """The page and the scale computed independently: numpy's 95th percentile of |credit| on the real tokens."""
    real = np.abs(np.array(SMALL + [OUTLIER] + SMALL[:10]))
    return render_heatmap(_maps()), float(np.quantile(real, 0.95))


def _tokens(page: str) -> list[list[tuple[str, str]]]:
    """Per response, the (class, title) of each token of method m's row."""
    rows = re.findall(r'>m <small>[^<]*</small></div><div class="tokens">(.*?)</div>', page)
    return [[(c, html.unescape(t)) for c, t in re.findall(r'<span class="([^"]*)" title="([^"]*)"', row)]
            for row in rows]


def test_row_scale_is_the_95th_percentile_of_the_real_tokens():
    page, expected = _page()
    maps = _maps()
    assert SCALE_QUANTILE == 0.95
    assert method_scale(maps.credit["m"][maps.rollouts.response_mask]) == pytest.approx(expected, rel=1e-12)
    assert f">m <small>±{expected:.3g}</small>" in page and f"<td>±{expected:.3g}</td>" in page
    assert expected < OUTLIER / 10  # the outlier does not set the scale


def test_scale_falls_back_to_the_max_when_the_quantile_is_0():
    assert method_scale(torch.tensor([0.0] * 99 + [-3.0])) == 3.0
    assert method_scale(torch.zeros(0)) == 0.0


def test_outlier_is_clipped_and_marked_small_values_are_coloured():
    page, expected = _page()
    first, second = _tokens(page)
    assert len(first) == 41 and len(second) == 10
    classes, title = first[-1]
    assert classes.split() == ["t", "p8", "clip"]
    assert title == f"{OUTLIER:+.4f}, beyond ±{expected:.3g}: clipped · step 1"
    for (classes, title), c in zip(first[:-1] + second, SMALL + SMALL[:10]):
        assert title.startswith(f"{c:+.4f}")  # the exact value on hover
        level = classes.split()[1]
        assert level != "z"  # visibly coloured, not white
        assert level[0] == ("p" if c > 0 else "n")
        assert ("clip" in classes.split()) == (abs(c) > expected)


def test_legend_states_the_rule():
    page, _ = _page()
    legend = re.search(r'<section id="legend">.*?</section>', page).group(0)
    text = re.sub(r"<[^>]+>", "", legend)
    assert "Colour scale per method" in text
    assert "±s" in text and "95th percentile of |credit|" in text
    assert "outlined tokens lie beyond it and are clipped to full colour" in text
