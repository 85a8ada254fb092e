"""lib_negip.blocks and the block numbering of lib_negip.unet_layers.

The preset tables and the block numbering are written out here by hand (from the documentation
in lib_negip/blocks.py and from the ldm module names of the tiny UNets), not computed with the
code under test.
"""

from __future__ import annotations

import re

import pytest
from tiny_unets import SD15, SDXL, make_ldm_unet
from torch import nn

from lib_negip.blocks import (
    ALL_LAYERS,
    PRESET_TABLES,
    PRESETS,
    LayerSpec,
    block_weights,
    layer_scales,
    parse_layers,
)
from lib_negip.errors import ArgumentError, IncompatibleModelError
from lib_negip.unet_layers import (
    CrossAttentionLayer,
    block_indices,
    cross_attention_layers,
    transformer_block_of,
    transformer_blocks,
)

EXAMPLE = '"3:1, 6:0.8"'

# --- preset tables, by hand -------------------------------------------------------------------------

SD1_STYLE = {
    0: 1.0,
    1: 1.0,
    2: 1.0,
    3: 1.0,
    9: 1.0,
    10: 1.0,
    11: 1.0,
    12: 1.0,
    13: 1.0,
    14: 1.0,
    15: 1.0,
}
SD1_COMPOSITION = {4: 0.25, 5: 1.0}
SD1_STRONG = dict.fromkeys((0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 1.0)
SDXL_STRONG = dict.fromkeys((0, 1, 2, 4, 5, 6, 7, 8, 9, 10), 1.0)


def dense(pairs: dict[int, float], n_blocks: int) -> tuple[float, ...]:
    return tuple(pairs.get(i, 0.0) for i in range(n_blocks))


PRESET_CASES = [
    pytest.param(16, "all", (1.0,) * 16, id="sd1-all"),
    pytest.param(16, "style", dense(SD1_STYLE, 16), id="sd1-style"),
    pytest.param(16, "composition", dense(SD1_COMPOSITION, 16), id="sd1-composition"),
    pytest.param(
        16,
        "style and composition",
        (1.0, 1.0, 1.0, 1.0, 0.25, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
        id="sd1-style-and-composition",
    ),
    pytest.param(16, "strong style", dense(SD1_STRONG, 16), id="sd1-strong-style"),
    pytest.param(11, "all", (1.0,) * 11, id="sdxl-all"),
    pytest.param(11, "style", dense({6: 1.0}, 11), id="sdxl-style"),
    pytest.param(11, "composition", dense({3: 1.0}, 11), id="sdxl-composition"),
    pytest.param(
        11, "style and composition", dense({3: 1.0, 6: 1.0}, 11), id="sdxl-style-and-composition"
    ),
    pytest.param(11, "strong style", dense(SDXL_STRONG, 11), id="sdxl-strong-style"),
]


@pytest.mark.parametrize(("n_blocks", "preset", "expected"), PRESET_CASES)
def test_preset_weights(n_blocks: int, preset: str, expected: tuple[float, ...]) -> None:
    spec = parse_layers("positive_layers", preset)
    assert spec.preset == preset
    assert spec.text() == preset
    weights = block_weights("positive_layers", spec, n_blocks)
    assert weights == expected
    assert all(type(weight) is float for weight in weights)


def test_preset_tables_exactly() -> None:
    assert PRESETS == ("all", "style", "composition", "style and composition", "strong style")
    assert set(PRESET_TABLES) == {16, 11}
    assert {k: dict(v) for k, v in PRESET_TABLES[16].items()} == {
        "style": SD1_STYLE,
        "composition": SD1_COMPOSITION,
        "style and composition": {**SD1_STYLE, **SD1_COMPOSITION},
        "strong style": SD1_STRONG,
    }
    assert {k: dict(v) for k, v in PRESET_TABLES[11].items()} == {
        "style": {6: 1.0},
        "composition": {3: 1.0},
        "style and composition": {3: 1.0, 6: 1.0},
        "strong style": SDXL_STRONG,
    }
    # The tables cannot be changed by a caller.
    with pytest.raises(TypeError):
        PRESET_TABLES[16]["style"][4] = 1.0  # type: ignore[index]
    with pytest.raises(TypeError):
        PRESET_TABLES[11]["new"] = {}  # type: ignore[index]


@pytest.mark.parametrize(
    ("written", "preset"),
    [
        ("STYLE", "style"),
        ("  Strong\t Style ", "strong style"),
        ("style   AND composition", "style and composition"),
        ("Composition", "composition"),
        ("All", "all"),
        ("", "all"),
        ("   ", "all"),
        (None, "all"),
    ],
)
def test_presets_normalised(written: str | None, preset: str) -> None:
    spec = parse_layers("negative_layers", written)
    assert spec.preset == preset
    assert spec.pairs == ()
    assert spec.is_all is (preset == "all")


def test_all_is_every_block_for_any_unet() -> None:
    assert ALL_LAYERS == LayerSpec() == parse_layers("x", "all")
    for n_blocks in (1, 3, 11, 16, 25):
        assert block_weights("x", ALL_LAYERS, n_blocks) == (1.0,) * n_blocks


# --- explicit pairs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "pairs", "text"),
    [
        ("3:1, 6:0.8", ((3, 1.0), (6, 0.8)), "3:1, 6:0.8"),
        ("6:0.8,3:1", ((3, 1.0), (6, 0.8)), "3:1, 6:0.8"),
        (" 15 : 5 , 0 : -1 ", ((0, -1.0), (15, 5.0)), "0:-1, 15:5"),
        ("4:.25", ((4, 0.25),), "4:0.25"),
        ("4:2.5E-1", ((4, 0.25),), "4:0.25"),
        ("4:+1.", ((4, 1.0),), "4:1"),
        ("007:0", ((7, 0.0),), "7:0"),
        ("2:-0.0", ((2, 0.0),), "2:0"),
    ],
)
def test_pairs(written: str, pairs: tuple[tuple[int, float], ...], text: str) -> None:
    spec = parse_layers("positive_layers", written)
    assert spec.preset is None
    assert not spec.is_all
    assert spec.pairs == pairs
    assert spec.text() == text
    # The canonical text parses to the same spec.
    assert parse_layers("positive_layers", text) == spec


def test_pairs_to_block_weights() -> None:
    spec = parse_layers("f", "3:1, 6:0.8, 0:-0.5")
    assert block_weights("f", spec, 11) == (-0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.8, 0.0, 0.0, 0.0, 0.0)
    assert block_weights("f", spec, 16)[:7] == (-0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.8)
    assert block_weights("f", spec, 16)[7:] == (0.0,) * 9
    assert block_weights("f", parse_layers("f", "15:2"), 16) == (0.0,) * 15 + (2.0,)
    assert block_weights("f", parse_layers("f", "10:2"), 11) == (0.0,) * 10 + (2.0,)


SYNTAX_ERRORS = [
    pytest.param("styles", ["'styles'", "0-15", "0-10"], id="unknown-preset"),
    pytest.param("weak style", ["'weak style'", "0-15"], id="unknown-preset-two-words"),
    pytest.param("3", ["'3'", "0-15"], id="no-weight"),
    pytest.param("3:", ["'3:'"], id="empty-weight"),
    pytest.param(":1", ["':1'"], id="no-index"),
    pytest.param("3=1", ["'3=1'"], id="equals"),
    pytest.param("3:1:1", ["'3:1:1'"], id="two-colons"),
    pytest.param("x:1", ["'x:1'"], id="letter-index"),
    pytest.param("-1:1", ["'-1:1'"], id="negative-index"),
    pytest.param("1.0:1", ["'1.0:1'"], id="float-index"),
    pytest.param("3:one", ["'3:one'"], id="word-weight"),
    pytest.param("3:1 6:1", ["'3:1 6:1'"], id="no-comma"),
    pytest.param("style, 3:1", ["'style'"], id="preset-and-pairs"),
]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3:nan", "the weight of block 3 must be a finite number from -1 to 5; got nan"),
        ("3:-inf", "the weight of block 3 must be a finite number from -1 to 5; got -inf"),
        ("3:1,,6:1", "an empty entry between commas"),
        ("3:1,", "an empty entry between commas"),
    ],
)
def test_non_finite_weights_and_empty_entries(value: str, expected: str) -> None:
    """Not-a-number and infinite weights get the weight's range; an empty entry says so."""
    with pytest.raises(ArgumentError) as caught:
        parse_layers("negative_layers", value)
    message = str(caught.value)
    assert message.startswith("negative_layers: "), message
    assert expected in message, message
    assert EXAMPLE in message


def test_a_syntax_error_quotes_the_entry_as_written() -> None:
    """The entry was quoted back lower-cased ('appendchild(...)' for 'appendChild(...)')."""
    with pytest.raises(ArgumentError, match=r"^negative_layers: 'Style Plus' is neither"):
        parse_layers("negative_layers", "3:1,  Style   Plus")
    assert parse_layers("negative_layers", " STRONG  Style ").text() == "strong style"
    assert parse_layers("negative_layers", "3:1E-1").text() == "3:0.1"


@pytest.mark.parametrize(("value", "patterns"), SYNTAX_ERRORS)
def test_syntax_errors(value: str, patterns: list[str]) -> None:
    with pytest.raises(ArgumentError) as caught:
        parse_layers("negative_layers", value)
    message = str(caught.value)
    assert message.startswith("negative_layers: "), message
    assert "neither a preset" in message
    assert "'strong style'" in message  # the presets are listed
    assert EXAMPLE in message
    assert "0-15" in message  # the block ranges
    assert "0-10" in message
    for pattern in patterns:
        assert pattern in message, (pattern, message)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        pytest.param("3:5.01", "5.01", id="above-5"),
        pytest.param("3:-1.5", "-1.5", id="below-minus-1"),
        pytest.param("3:1e400", "1e400", id="overflow-to-inf"),
        pytest.param("0:1, 3:100", "100", id="second-pair"),
    ],
)
def test_weight_out_of_range(value: str, shown: str) -> None:
    with pytest.raises(ArgumentError) as caught:
        parse_layers("positive_layers", value)
    message = str(caught.value)
    assert message.startswith("positive_layers: the weight of block 3 "), message
    assert "finite number from -1 to 5" in message
    assert f"got {shown}." in message
    assert EXAMPLE in message


@pytest.mark.parametrize("value", ["3:1, 3:1", "3:1, 6:1, 03:0.5"])
def test_duplicate_index(value: str) -> None:
    with pytest.raises(ArgumentError) as caught:
        parse_layers("positive_layers", value)
    message = str(caught.value)
    assert message.startswith("positive_layers: block 3 is listed twice"), message
    assert EXAMPLE in message


@pytest.mark.parametrize("value", [3, 1.0, True, ["3:1"], {"3": 1}, b"style"])
def test_not_a_string(value: object) -> None:
    with pytest.raises(ArgumentError) as caught:
        parse_layers("positive_layers", value)
    message = str(caught.value)
    assert message.startswith("positive_layers must be a preset"), message
    assert f"({type(value).__name__})" in message
    assert EXAMPLE in message


@pytest.mark.parametrize(
    ("value", "n_blocks", "index", "family"),
    [
        pytest.param("16:1", 16, 16, "SD1.x (16 blocks, 0-15)", id="sd1-16"),
        pytest.param("3:1, 99:1", 16, 99, "SD1.x (16 blocks, 0-15)", id="sd1-99"),
        pytest.param("11:1", 11, 11, "SDXL (11 blocks, 0-10)", id="sdxl-11"),
        pytest.param("15:1", 11, 15, "SDXL (11 blocks, 0-10)", id="sdxl-sd1-index"),
        pytest.param("5:1", 5, 5, "5 blocks", id="other-unet"),
    ],
)
def test_index_out_of_range(value: str, n_blocks: int, index: int, family: str) -> None:
    spec = parse_layers("negative_layers", value)  # the syntax is fine
    with pytest.raises(ArgumentError) as caught:
        block_weights("negative_layers", spec, n_blocks)
    message = str(caught.value)
    assert message.startswith(f"negative_layers: block {index} does not exist"), message
    assert family in message
    assert EXAMPLE in message


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        pytest.param("1234567:1", "1234567", id="seven-digits"),
        pytest.param("9" * 990 + ":1", "999999999999...", id="hundreds-of-digits"),
    ],
)
def test_index_of_no_unet_is_refused_while_parsing(value: str, shown: str) -> None:
    """An index no UNet has is refused as an ArgumentError naming it (a 5000-digit one was
    past int()'s digit limit: a ValueError, an HTTP 500 through the API's infotext)."""
    assert parse_layers("positive_layers", "0000003:1").pairs == ((3, 1.0),)  # zeros are fine
    with pytest.raises(ArgumentError) as caught:
        parse_layers("positive_layers", value)
    message = str(caught.value)
    assert message.startswith(f"positive_layers: block {shown} does not exist"), message
    assert "SD1.x UNets have blocks 0-15, SDXL ones 0-10" in message
    assert EXAMPLE in message
    # Past int()'s digit limit (a ValueError, once an HTTP 500 through the API's infotext): the
    # text is refused by its length first.
    with pytest.raises(ArgumentError, match=r"^positive_layers is 5,002 characters long"):
        parse_layers("positive_layers", "9" * 5000 + ":1")


@pytest.mark.parametrize(
    "preset", ["style", "composition", "style and composition", "strong style"]
)
@pytest.mark.parametrize("n_blocks", [5, 12, 70])
def test_preset_on_an_unknown_layout(preset: str, n_blocks: int) -> None:
    with pytest.raises(ArgumentError) as caught:
        block_weights("positive_layers", parse_layers("positive_layers", preset), n_blocks)
    message = str(caught.value)
    assert message.startswith(f"positive_layers: the preset '{preset}'"), message
    assert f"this UNet has {n_blocks}" in message
    assert f"(0-{n_blocks - 1})" in message
    assert "'all'" in message
    assert EXAMPLE in message


def test_layer_scales() -> None:
    positive = (1.0, 0.5, 0.0)
    negative = (0.0, 2.0, -1.0)
    assert layer_scales(positive, negative, [0, 0, 2, 1, 1]) == [
        (1.0, 0.0),
        (1.0, 0.0),
        (0.0, -1.0),
        (0.5, 2.0),
        (0.5, 2.0),
    ]
    assert layer_scales(positive, negative, []) == []


# --- block numbering of the UNets' cross-attention layers -------------------------------------------

#: SD1.5: transformer block -> block index (input, middle, output), written from the module names.
SD15_BLOCKS = {
    "input_blocks.1.1": 0,
    "input_blocks.2.1": 1,
    "input_blocks.4.1": 2,
    "input_blocks.5.1": 3,
    "input_blocks.7.1": 4,
    "input_blocks.8.1": 5,
    "middle_block.1": 6,
    "output_blocks.3.1": 7,
    "output_blocks.4.1": 8,
    "output_blocks.5.1": 9,
    "output_blocks.6.1": 10,
    "output_blocks.7.1": 11,
    "output_blocks.8.1": 12,
    "output_blocks.9.1": 13,
    "output_blocks.10.1": 14,
    "output_blocks.11.1": 15,
}
#: SDXL: transformer block -> (block index, depth).
SDXL_BLOCKS = {
    "input_blocks.4.1": (0, 2),
    "input_blocks.5.1": (1, 2),
    "input_blocks.7.1": (2, 10),
    "input_blocks.8.1": (3, 10),
    "middle_block.1": (4, 10),
    "output_blocks.0.1": (5, 10),
    "output_blocks.1.1": (6, 10),
    "output_blocks.2.1": (7, 10),
    "output_blocks.3.1": (8, 2),
    "output_blocks.4.1": (9, 2),
    "output_blocks.5.1": (10, 2),
}
#: The adapter's layer order: input blocks, then output blocks, then the middle block.
SD15_ADAPTER_ORDER = [
    *(f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)),
    *(f"output_blocks.{i}.1" for i in range(3, 12)),
    "middle_block.1",
]
SDXL_ADAPTER_ORDER = [
    *(f"input_blocks.{i}.1" for i in (4, 5, 7, 8)),
    *(f"output_blocks.{i}.1" for i in range(6)),
    "middle_block.1",
]


def expected_layers(order: list[str], depth_of: dict[str, int]) -> list[str]:
    return [
        f"{block}.transformer_blocks.{t}.attn2" for block in order for t in range(depth_of[block])
    ]


@pytest.fixture(scope="module")
def sd15_layers() -> list[CrossAttentionLayer]:
    return cross_attention_layers(make_ldm_unet(SD15))


@pytest.fixture(scope="module")
def sdxl_layers() -> list[CrossAttentionLayer]:
    return cross_attention_layers(make_ldm_unet(SDXL))


def test_sd15_block_indices(sd15_layers: list[CrossAttentionLayer]) -> None:
    names = [layer.name for layer in sd15_layers]
    assert names == expected_layers(SD15_ADAPTER_ORDER, dict.fromkeys(SD15_BLOCKS, 1))
    assert len(names) == 16
    assert transformer_blocks(sd15_layers) == list(SD15_BLOCKS)
    # Adapter order: input 0..5, output 7..15, then the middle block 6.
    assert block_indices(sd15_layers) == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 6]
    for layer, index in zip(sd15_layers, block_indices(sd15_layers), strict=True):
        assert SD15_BLOCKS[layer.name.split(".transformer_blocks.")[0]] == index


def test_sdxl_block_indices(sdxl_layers: list[CrossAttentionLayer]) -> None:
    names = [layer.name for layer in sdxl_layers]
    depth_of = {block: depth for block, (_, depth) in SDXL_BLOCKS.items()}
    assert names == expected_layers(SDXL_ADAPTER_ORDER, depth_of)
    assert len(names) == 70
    assert transformer_blocks(sdxl_layers) == list(SDXL_BLOCKS)
    indices = block_indices(sdxl_layers)
    assert len(indices) == 70
    assert sorted(set(indices)) == list(range(11))
    # Written out: the depth-2 and depth-10 layers share their block's index.
    assert indices == (
        [0] * 2
        + [1] * 2
        + [2] * 10
        + [3] * 10  # input blocks 4, 5, 7, 8
        + [5] * 10
        + [6] * 10
        + [7] * 10
        + [8] * 2
        + [9] * 2
        + [10] * 2  # output blocks 0..5
        + [4] * 10  # the middle block, last in the adapter's order
    )
    for layer, index in zip(sdxl_layers, indices, strict=True):
        assert SDXL_BLOCKS[transformer_block_of(layer.name)][0] == index


def test_block_indices_follow_the_layers_given(sdxl_layers: list[CrossAttentionLayer]) -> None:
    """block_indices maps the layers in the order it is given them, not in a fixed order."""
    reordered = list(reversed(sdxl_layers))
    assert block_indices(reordered) == list(reversed(block_indices(sdxl_layers)))
    # A subset keeps the numbering of its own distinct blocks, input, middle, output.
    middle_and_first = [sdxl_layers[-1], sdxl_layers[0]]
    assert block_indices(middle_and_first) == [1, 0]


def test_presets_select_the_documented_modules(
    sd15_layers: list[CrossAttentionLayer], sdxl_layers: list[CrossAttentionLayer]
) -> None:
    """InstantStyle's SDXL blocks: style = up_blocks.0.attentions.1 (output_blocks.1),
    composition = down_blocks.2.attentions.1 (input_blocks.8)."""

    def selected(layers: list[CrossAttentionLayer], preset: str, n_blocks: int) -> set[str]:
        weights = block_weights("f", parse_layers("f", preset), n_blocks)
        return {
            transformer_block_of(layer.name)
            for layer, block in zip(layers, block_indices(layers), strict=True)
            if weights[block] != 0.0
        }

    assert selected(sdxl_layers, "style", 11) == {"output_blocks.1.1"}
    assert selected(sdxl_layers, "composition", 11) == {"input_blocks.8.1"}
    assert selected(sdxl_layers, "strong style", 11) == set(SDXL_BLOCKS) - {"input_blocks.8.1"}
    assert selected(sd15_layers, "composition", 16) == {"input_blocks.7.1", "input_blocks.8.1"}
    assert selected(sd15_layers, "style", 16) == {
        "input_blocks.1.1",
        "input_blocks.2.1",
        "input_blocks.4.1",
        "input_blocks.5.1",
        *(f"output_blocks.{i}.1" for i in range(5, 12)),
    }
    # Per layer, in the adapter's order: the scales that the hijack gets.
    weights = block_weights("f", parse_layers("f", "composition"), 16)
    scales = layer_scales(weights, (1.0,) * 16, block_indices(sd15_layers))
    assert [positive for positive, _ in scales] == [0, 0, 0, 0, 0.25, 1.0] + [0.0] * 10
    assert all(negative == 1.0 for _, negative in scales)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(2, 2)
        self.to_k = nn.Linear(2, 2)
        self.to_v = nn.Linear(2, 2)
        self.to_out = nn.ModuleList([nn.Linear(2, 2)])
        self.heads = 1


def test_prefixed_names_and_two_digit_blocks() -> None:
    """A1111 wraps the UNet (model.diffusion_model...): numbering by the names after the group."""
    layers = [
        CrossAttentionLayer(f"model.diffusion_model.{name}", _Attention())
        for name in (
            "output_blocks.10.1.transformer_blocks.0.attn2",
            "input_blocks.2.1.transformer_blocks.1.attn2",
            "middle_block.1.transformer_blocks.0.attn2",
            "output_blocks.2.1.transformer_blocks.0.attn2",
            "input_blocks.2.1.transformer_blocks.0.attn2",
            "input_blocks.11.1.transformer_blocks.0.attn2",
        )
    ]
    assert transformer_blocks(layers) == [
        "model.diffusion_model.input_blocks.2.1",
        "model.diffusion_model.input_blocks.11.1",
        "model.diffusion_model.middle_block.1",
        "model.diffusion_model.output_blocks.2.1",
        "model.diffusion_model.output_blocks.10.1",
    ]
    assert block_indices(layers) == [4, 0, 2, 3, 0, 1]


def test_layers_outside_a_transformer_block() -> None:
    assert transformer_block_of("input_blocks.4.1.transformer_blocks.3.attn2") == "input_blocks.4.1"
    with pytest.raises(IncompatibleModelError, match=re.escape("'input_blocks.1.1.attn2'")):
        transformer_block_of("input_blocks.1.1.attn2")
    with pytest.raises(IncompatibleModelError, match=r"not inside input_blocks"):
        block_indices([CrossAttentionLayer("blocks.0.transformer_blocks.0.attn2", _Attention())])
