"""Ablation configs: the shipped ones parse, defaults are filled in, and every mistake names file, key and rule."""

import glob
import os
from dataclasses import replace

import pytest

from qvl.ablate.config import (
    README,
    ConfigError,
    config_toml,
    load_config,
    parse_config,
    schema_markdown,
    with_dtype,
    with_preset,
    with_schema_docs,
)
from qvl.ablate.defaults import default_config
from qvl.backends import OPERATORS
from qvl.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "ablations", "*.toml")))

MINIMAL = """
reference = "eager"
[[variants]]
name = "eager"
"""


def parse(text: str, path: str = "ablations/x.toml"):
    return parse_config(text, path=path, default_name="x")


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse(text)
    return str(e.value)


def test_the_shipped_configs_are_all_there():
    names = {os.path.basename(p) for p in SHIPPED}
    assert {"backend_per_operator.toml", "backend_mix.toml", "vision_window_size.toml", "dtype.toml",
            "long_prompt_prefill.toml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    assert cfg.name == os.path.splitext(os.path.basename(path))[0]
    assert cfg.reference in [v.name for v in cfg.variants]
    for v in cfg.variants:
        assert set(v.backends) == set(OPERATORS)
        cfg.model_config(v).validate()


def test_long_prompt_prefill_is_gpu_sized():
    cfg = load_config(os.path.join(ROOT, "ablations", "long_prompt_prefill.toml"))
    assert cfg.model.preset == "3b" and cfg.model.device == "cuda"
    assert cfg.workload.prompt_tokens >= 4096


def test_defaults():
    cfg = parse(MINIMAL)
    assert cfg.name == "x" and cfg.model.preset == "tiny" and cfg.model.dtype == "float32"
    assert cfg.model.device == "auto" and cfg.run.repeats is None and cfg.run.warmup == 1
    assert cfg.run.fallback is None  # strict unless asked
    (v,) = cfg.variants
    assert v.backends == {op: "eager" for op in OPERATORS} and v.dtype is None and v.overrides == {}
    assert cfg.workload.images == () and cfg.workload.decode_tokens >= 1


def test_full_config_round_trip():
    cfg = parse("""
name = "study-1"
reference = "ref"
[model]
preset = "tiny"
dtype = "bfloat16"
device = "cpu"
seed = 3
[model.overrides]
"text.rope_theta" = 10000
vision.window_size = 112   # a dotted key: a nested table, flattened to "vision.window_size"
[workload]
images = [{ size = [224, 336] }]
videos = [{ size = [112, 112], frames = 3, fps = 1 }]
prompt_tokens = 8
decode_tokens = 4
batch_size = 2
seed = 7
[run]
warmup = 0
repeats = 2
fallback = "eager"
[[variants]]
name = "ref"
backends = { attention = "triton", norm = "eager" }
[[variants]]
name = "mix"
backends = "attention=triton, mlp=xformers"
fallback = "none"
dtype = "float32"
overrides = { "text.mrope_section" = [2, 3, 3], "vision.fullatt_block_indexes" = [0] }
""")
    assert cfg.name == "study-1"
    assert cfg.model.overrides == {"text.rope_theta": 10000.0, "vision.window_size": 112}
    assert cfg.workload.videos[0].fps == 1.0 and cfg.workload.videos[0].frames == 3
    ref, mix = cfg.variants
    assert ref.backends["attention"] == "triton" and ref.backends["rope"] == "eager" and ref.fallback == "eager"
    assert mix.backends["mlp"] == "xformers" and mix.fallback is None and mix.dtype == "float32"
    arch = cfg.model_config(mix)
    assert arch.vision.window_size == 112 and arch.vision.fullatt_block_indexes == (0,)
    assert arch.text.rope_theta == 10000.0
    assert cfg.dtype_of(ref) == "bfloat16" and cfg.dtype_of(mix) == "float32"
    assert cfg.to_dict()["variants"][1]["overrides"]["text.mrope_section"] == [2, 3, 3]


@pytest.mark.parametrize("text, expected", [
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[workload]\n'
     'images = [{ size = [224, 224] }, { size = [224] }]',
     "ablations/x.toml: [workload] images[1]: size must be [height, width] of positive ints, got [224]"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[workload]\nimages = [{ size = [0, 224] }]',
     "[workload] images[0]: size must be [height, width] of positive ints"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[workload]\nimages = [{ size = [28, 28], file = "a.png" }]',
     "[workload] images[0]: give exactly one of size"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[workload]\nimages = [{ file = "missing.png" }]',
     "[workload] images[0]: file: no such file"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[workload]\nimages = [{ sise = [28, 28] }]',
     "[workload] images[0]: sise: unknown key; allowed keys: size"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[workload]\nvideos = [{ size = [28, 28] }]',
     "[workload] videos[0]: frames: is required"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[workload]\nbatch_size = 0',
     "[workload] batch_size: must be an integer >= 1, got 0"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[workload]\ndecode_tokens = "8"',
     "[workload] decode_tokens: must be an integer >= 1, got '8'"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[workload]\nprompt_tokens = 0',
     "[workload] prompt_tokens: must be >= 1 when the workload has no images or videos"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[model]\ndtype = "fp8"',
     "[model] dtype: must be one of float32, float16, bfloat16; got 'fp8'"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[model]\npreset = "huge"',
     "[model] preset: must be one of tiny, 3b, 7b, 32b, 72b"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[model]\ndevice = "tpu"',
     "[model] device: must be auto, cpu, cuda or cuda:N"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[model]\npreset = "tiny"\ncheckpoint = "x"',
     "[model] checkpoint: give either preset or checkpoint, not both"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[model]\ncheckpoint = "nowhere"',
     "[model] checkpoint: no config.json in"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[model]\nprecision = "x"',
     "[model] precision: unknown key; allowed keys: preset"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[model]\noverrides = { "vision.window" = 56 }',
     "[model] overrides: vision.window: unknown field; vision fields:"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[model]\noverrides = { "audio.x" = 1 }',
     "[model] overrides: audio.x: unknown config section"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[model]\noverrides = { "vision.window_size" = "big" }',
     "[model] overrides: vision.window_size: must be an integer, got 'big'"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[model]\noverrides = { "vision.window_size" = 50 }',
     "[model] overrides: invalid Qwen2.5-VL config: vision.window_size (50) must be a positive multiple"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[run]\nrepeats = 0',
     "[run] repeats: must be an integer >= 1, got 0"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[run]\nfallback = "auto"',
     "[run] fallback: must be one of none, eager"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\nbackends = "atention=triton"',
     "variants[0] (eager) backends: unknown operator 'atention'; valid options are: attention, rope, norm, mlp, cache"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\nbackends = "cuda"',
     "variants[0] (eager) backends: unknown backend 'cuda'; valid options are: eager, triton, triton-gemm, xformers, "
     "auto"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\nbackends = "attention=triton,norm"',
     "variants[0] (eager) backends: 'norm' is not operator=backend"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\nbackends = 3',
     "variants[0] (eager) backends: must be a backend name"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\nfast = true',
     "variants[0] (eager) fast: unknown key; allowed keys: name"),
    ('reference = "eager"\n[[variants]]\nbackends = "eager"',
     "variants[0] name: is required"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[[variants]]\nname = "eager"',
     "variants[1] (eager) name: duplicate variant name 'eager'"),
    ('reference = "triton"\n[[variants]]\nname = "eager"',
     "ablations/x.toml: reference: must name one of the variants: eager; got 'triton'"),
    ('[[variants]]\nname = "eager"', "ablations/x.toml: reference: is required"),
    ('reference = "eager"\nvariants = []', "ablations/x.toml: variants: must be a non-empty array of tables"),
    ('reference = "eager"\nvariant = 1\n[[variants]]\nname = "eager"',
     "ablations/x.toml: variant: unknown key; allowed keys:"),
    ('name = "a b"\nreference = "eager"\n[[variants]]\nname = "eager"', "ablations/x.toml: name: must be letters"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\noverrides = { "text.mrope_section" = [1, 1, 1] }',
     "variants[0] (eager) overrides: invalid Qwen2.5-VL config: text.mrope_section (1, 1, 1) sums to 3"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\ndtype = "half"',
     "variants[0] (eager) dtype: must be one of float32, float16, bfloat16"),
    ('reference = = "eager"', "ablations/x.toml: not valid TOML"),
    # derived from the schema: the type, the minimum, the choices and the allowed keys come from the dataclasses
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[workload]\nseed = 1.5',
     "ablations/x.toml: [workload] seed: must be an integer, got 1.5"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[run]\nwarmup = -1',
     "ablations/x.toml: [run] warmup: must be an integer >= 0, got -1"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[workload]\n'
     'videos = [{ size = [28, 28], frames = 2, fps = 0 }]',
     "ablations/x.toml: [workload] videos[0]: fps: must be a positive number, got 0"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\ndescription = 3',
     "ablations/x.toml: variants[0] (eager) description: must be a string, got 3"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[run]\nfallback = "gpu"',
     "ablations/x.toml: [run] fallback: must be one of none, eager, triton, triton-gemm, xformers; got 'gpu'"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[model]\noverrides = { "text.mrope_section" = [8, 8] }',
     "ablations/x.toml: [model] overrides: text.mrope_section: must be a list of 3 integers, got [8, 8]"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[model]\noverrides = { "text.tie_word_embeddings" = 1 }',
     "ablations/x.toml: [model] overrides: text.tie_word_embeddings: must be true or false, got 1"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[workload]\nvideos = [{ frames = 2 }]',
     "ablations/x.toml: [workload] videos[0]: size: is required ([height, width] of positive ints)"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[run]\nrepeat = 3',
     "ablations/x.toml: [run] repeat: unknown key; allowed keys: warmup (integer >= 0); repeats (integer >= 1); "
     "fallback (one of none, eager, triton, triton-gemm, xformers)"),
    ('reference = "eager"\n[[variants]]\nname = "eager"\n[workload]\nimages = [{ }]',
     "ablations/x.toml: [workload] images[0]: give exactly one of size ([height, width] of positive ints) or file"),
    ('reference = "eager"\n[[variants]]\nname = " "', "ablations/x.toml: variants[0] ( ) name: must not be empty"),
    ('reference = "eager"\nmodel = 3\n[[variants]]\nname = "eager"',
     "ablations/x.toml: [model]: must be a table, got 3"),
    ('reference = "eager"\nvariants = [3]', "ablations/x.toml: variants[0]: must be a table, got 3"),
])
def test_errors_name_file_key_and_rule(text, expected):
    assert expected in error_of(text)


def test_variant_names_are_stripped_and_fallbacks_default_to_runs():
    cfg = parse('reference = "e"\n[run]\nfallback = "eager"\n[[variants]]\nname = " e "\n[[variants]]\nname = "s"\n'
                'fallback = "none"')
    assert [(v.name, v.fallback) for v in cfg.variants] == [("e", "eager"), ("s", None)]


def test_readme_schema_tables_are_generated_from_the_schema():
    with open(README, encoding="utf-8") as f:
        readme = f.read()
    assert schema_markdown() in readme
    assert with_schema_docs(readme) == readme, (
        "ablations/README.md's schema tables are out of date; regenerate them with "
        "`.venv/bin/python -c \"from qvl.ablate.config import write_schema_docs; write_schema_docs()\"`")


def test_every_key_is_documented():
    text = schema_markdown()
    for section in ("### Top level", "### [model]", "### [workload]", "### [workload] images entries",
                    "### [workload] videos entries", "### [run]", "### [[variants]]"):
        assert section in text
    for key in ("reference", "preset", "checkpoint", "overrides", "prompt_tokens", "min_pixels", "frames", "fps",
                "repeats", "fallback", "backends", "cuda_graph"):
        assert f"| `{key}` |" in text
    assert "| `decode_tokens` | integer >= 1 | `8` |" in text
    assert "| `dtype` | one of float32, float16, bfloat16 | `\"float32\"` |" in text


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_config_toml_has_every_default_and_parses_back(path):
    cfg = load_config(path)
    text = config_toml(cfg)
    assert "max_pixels = " in text and "cuda_graph = " in text  # the defaults, written out
    assert parse_config(text, path=path, default_name="other") == replace(cfg, source=text)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_default_configs_are_expressible_as_toml(device):
    cfg = default_config(device)
    text = config_toml(cfg)
    assert parse_config(text, default_name="other") == replace(cfg, path="<config>", source=text)


def test_image_file_resolves_from_the_config_folder(tmp_path):
    from PIL import Image

    Image.new("RGB", (30, 20)).save(tmp_path / "pic.png")  # its header is read at parse time (the workload check)
    path = tmp_path / "c.toml"
    path.write_text('reference = "e"\n[workload]\nimages = [{ file = "pic.png" }]\n[[variants]]\nname = "e"\n')
    cfg = load_config(path)
    assert cfg.workload.images[0].file == str(tmp_path / "pic.png")


def test_unreadable_file():
    with pytest.raises(ConfigError, match="nope.toml: no such file"):
        load_config("nope.toml")


def test_with_preset_revalidates():
    cfg = parse(MINIMAL)
    assert with_preset(cfg, "3b").model_config().text.hidden_size == 2048
    bad = parse('reference = "e"\n[[variants]]\nname = "e"\noverrides = { "text.mrope_section" = [2, 3, 3] }')
    with pytest.raises(ConfigError, match="sums to 8"):
        with_preset(bad, "3b")  # fine for tiny's head_dim, not for 3b's


def test_cuda_graph_flag():
    cfg = parse('reference = "e"\n[[variants]]\nname = "e"\n[[variants]]\nname = "g"\ncuda_graph = true')
    assert [v.cuda_graph for v in cfg.variants] == [False, True]
    with pytest.raises(ConfigError, match=r"variants\[0\] \(e\) cuda_graph: must be true or false, got 'yes'"):
        parse('reference = "e"\n[[variants]]\nname = "e"\ncuda_graph = "yes"')


def test_with_dtype_keeps_variants_that_set_their_own():
    cfg = with_dtype(load_config(os.path.join(ROOT, "ablations", "dtype.toml")), "bfloat16")
    assert cfg.model.dtype == "bfloat16"
    assert {v.name: cfg.dtype_of(v) for v in cfg.variants}["eager float16"] == "float16"
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'; dtypes: float32, float16, bfloat16"):
        with_dtype(cfg, "fp8")


def test_cli_check(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text(MINIMAL)
    assert main(["ablate", str(good), "--check"]) == 0
    out = capsys.readouterr().out
    assert "ok: good, preset tiny in float32" in out
    assert "# with every default filled in" in out and 'device = "auto"' in out and 'backends = "eager"' in out
    assert main(["ablate", str(good), "--check", "--preset", "3b", "--dtype", "bfloat16"]) == 0
    assert "ok: good, preset 3b in bfloat16" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL + 'dtype = "fp4"\n')
    assert main(["ablate", str(bad), "--check"]) == 2
    assert "bad.toml: variants[0] (eager) dtype: must be one of" in capsys.readouterr().err
