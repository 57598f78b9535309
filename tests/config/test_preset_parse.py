"""The one preset parser (``config.schema.Preset``): every form a config file, the studies and the
retroactive config's GRPO variants use, and its text form read back."""

import dataclasses

import pytest
from conftest import load_config

from pbbjax.config.schema import Preset, base_config, select_preset


@pytest.mark.parametrize(
    "text, name, pod, rl, size",
    [
        (None, "demo", None, False, "demo"),
        ("cpu", "cpu", None, False, "cpu"),
        ("tiny", "tiny", None, False, "tiny"),
        ("qwen3-14b,v5p-64", "qwen3-14b", "v5p-64", False, "paper"),
        ("qwen3-4b-lora", "qwen3-4b-lora", None, False, "paper"),
        ("rl", "cpu", None, True, "cpu"),
        ("rl-tiny", "tiny", None, True, "tiny"),
        ("rl-qwen3-8b,v5p-32", "qwen3-8b", "v5p-32", True, "paper"),
    ],
)
def test_preset_forms(text, name, pod, rl, size):
    p = Preset.parse(text)
    assert (p.name, p.pod, p.rl, p.size) == (name, pod, rl, size)
    assert Preset.parse(str(p)) == p
    assert str(p) == (text or "demo")


def test_the_rl_variant_of_a_preset():
    """What a study's GRPO run loads: the same size and pod, as configs/retroactive.py reads it."""
    assert str(dataclasses.replace(Preset.parse("cpu"), rl=True)) == "rl"
    assert str(dataclasses.replace(Preset.parse("qwen3-8b,v5p-32"), rl=True)) == "rl-qwen3-8b,v5p-32"


def test_rl_demo_is_grpo_at_the_demo_size_after_an_sft_warm_up():
    """``rl-demo`` (the retroactive study's demo size): the main job's programs, GRPO with CoT-length
    rollouts after SFT steps that teach the answer format, not the paper-scale GRPO settings."""
    c = load_config("configs/retroactive.py:rl-demo")
    assert c.data.num_train_instructions == 16 and c.data.cot  # the demo preset's data
    assert c.rl.stages == ("stage2",) and c.rl.sft_warmup_steps == 10
    assert c.rl.max_new_tokens == 48 and c.rl.prompts_per_step == 4  # not the paper's 512 and 32


def test_select_preset_refuses_what_it_cannot_apply():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        select_preset(base_config("proactive"), "gpt5")
    with pytest.raises(ValueError, match="rl presets are configs/retroactive.py's"):
        select_preset(base_config("proactive"), "rl-tiny")
    with pytest.raises(ValueError, match="the cpu preset takes no pod"):
        select_preset(base_config("proactive"), "cpu,v5p-8")
