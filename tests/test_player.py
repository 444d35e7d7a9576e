"""sdlib.player: the precomputed frames of the book's interactive figures, in the order sdbook.js reads them."""

import html
import json
import re

import numpy as np
import pytest

from sdlib.player import Slider, frames, player_html


def test_slider_picks_the_nearest_initial_value_and_labels_every_value():
    slider = Slider("lam", "λ", 10.0 ** np.arange(-2, 1.01, 1.0), initial=0.2, fmt="{:.3g}")
    assert slider["values"] == [0.01, 0.1, 1.0, 10.0] and slider["initial"] == 1
    assert slider["labels"] == ["0.01", "0.1", "1", "10"]
    with pytest.raises(ValueError, match="'x': values must not be empty"):
        Slider("x", "x", [])


def test_frames_follow_the_players_flat_index_last_slider_fastest():
    sliders = [Slider("a", "a", [0.0, 1.0, 2.0]), Slider("b", "b", [10.0, 20.0])]
    out = frames(lambda a, b: [a, b, a * b], sliders, ["a", "b"])
    for i, a in enumerate(sliders[0]["values"]):
        for j, b in enumerate(sliders[1]["values"]):
            assert out[i * 2 + j] == [a, b, a * b]  # sdbook.js: flat = flat * len(values) + index
    assert frames(lambda b: [b], sliders, ["b"]) == [[10.0], [20.0]]
    assert frames(lambda: [1.23456789], sliders, []) == [1.235]  # no slider: one list, rounded to 4 digits
    with pytest.raises(ValueError, match=r"unknown sliders \['c'\]"):
        frames(lambda c: [c], sliders, ["c"])


def test_player_html_carries_the_spec_as_json_that_cannot_end_its_script():
    slider = Slider("a", "a", [0.0, 1.0])
    spec = {"sliders": [slider], "x": [0, 1], "xlim": [0, 1], "ylim": [0, 1], "xlabel": "x </script>",
            "ylabel": "y", "alt": "a line", "series": [{"y": frames(lambda a: [a, a], [slider], ["a"]),
                                                       "depends": ["a"]}]}
    page = player_html(spec).data
    assert page.startswith('<div class="sd-player">') and page.count("</script>") == 1
    data = re.search(r'<script type="application/json">(.*?)</script>', page, re.S).group(1)
    assert json.loads(html.unescape(data)) == json.loads(json.dumps(spec))
    with pytest.raises(ValueError, match="player spec needs 'alt'"):
        player_html({key: value for key, value in spec.items() if key != "alt"})
    with pytest.raises(ValueError):  # NaN cannot reach the page
        player_html({**spec, "ylim": [0, float("nan")]})
