"""train.mask policies, token by token, on Qwen3-, Llama-3.1- and gpt-oss-style templates.

Each template below is a condensed but faithful copy of the model's own Jinja template
(the branches a multi-turn chat with reasoning, tool calls and tool results takes). The
tokenizers are byte-level (one token per byte, one per special token), built here, so
the expected mask is written as text segments, each trained or not, and compared with
the trainer's mask token by token.
"""

from __future__ import annotations

import pytest

from mlx_tune.data.masks import MaskPolicy, template_traits
from mlx_tune.data.tokenize import tokenize_chat

QWEN3 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and not (message.content.startswith('<tool_response>')"
    " and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is defined and message.reasoning_content is not none %}"
    "{%- set reasoning_content = message.reasoning_content %}"
    "{%- else %}{%- if '</think>' in message.content %}"
    "{%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- endif %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}"
    "{%- if (loop.first and content) or (not loop.first) %}{{- '\\n' }}{%- endif %}"
    "{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA31 = (
    "{{- bos_token }}{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- elif 'tool_calls' in message %}{%- set tool_call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{{- '{\"name\": \"' + tool_call.name + '\", ' }}{{- '\"parameters\": ' }}{{- tool_call.arguments | tojson }}{{- '}' }}"
    "{{- '<|eom_id|>' }}"
    "{%- elif message.role == 'tool' or message.role == 'ipython' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}{{- message.content }}{{- '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

GPT_OSS = (
    "{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\\n"
    "Reasoning: medium\\n\\n# Valid channels: analysis, commentary, final.<|end|>' }}"
    "{%- set last_user = namespace(i=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set last_user.i = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{- '<|start|>user<|message|>' + message.content + '<|end|>' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- if message.thinking and loop.index0 > last_user.i %}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking + '<|end|>' }}{%- endif %}"
    "{%- if message.tool_calls %}{%- set tc = message.tool_calls[0].function %}"
    "{{- '<|start|>assistant to=functions.' + tc.name + '<|channel|>commentary json<|message|>' }}"
    "{{- tc.arguments | tojson }}{{- '<|call|>' }}"
    "{%- else %}{{- '<|start|>assistant<|channel|>final<|message|>' + message.content }}"
    "{%- if loop.last %}{{- '<|return|>' }}{%- else %}{{- '<|end|>' }}{%- endif %}{%- endif %}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|start|>functions.' + message.name + ' to=assistant<|channel|>commentary<|message|>' + message.content + '<|end|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)


def make_tokenizer(template: str, specials: list[str], eos: list[str], bos: str | None = None):
    """Byte-level BPE: every byte one token, every special one token (ids 0..len(specials)-1)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials)}
    for sym in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[sym] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos[0], bos_token=bos, pad_token=specials[0],
                                 additional_special_tokens=[s for s in specials if s not in (eos[0], bos, specials[0])])
    hf.chat_template = template
    return TokenizerWrapper(hf, eos_token_ids=[vocab[e] for e in eos])


@pytest.fixture(scope="module")
def qwen3():
    return make_tokenizer(QWEN3, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<|im_end|>", "<|endoftext|>"])


@pytest.fixture(scope="module")
def llama31():
    specials = ["<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"]
    return make_tokenizer(LLAMA31, specials, ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"], bos="<|begin_of_text|>")


@pytest.fixture(scope="module")
def gpt_oss():
    specials = ["<|endoftext|>", "<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>"]
    return make_tokenizer(GPT_OSS, specials, ["<|return|>", "<|call|>", "<|endoftext|>"])


CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def agent_chat() -> list[dict]:
    """Two user turns; the first answered with reasoning, a tool call and its result."""
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "<think>\nNeed the tool.\n</think>\n\n", "tool_calls": [CALL]},
        {"role": "tool", "name": "get_weather", "content": "18C sunny"},
        {"role": "assistant", "content": "<think>\nIt is sunny.\n</think>\n\nSunny, 18C."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "<think>\nBe polite.\n</think>\n\nYou're welcome."},
    ]


def flags(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Token ids and trained flags of text segments (byte-level: segments tokenize on their own)."""
    ids, train = [], []
    for text, trained in segments:
        part = tokenizer._tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += part
        train += [trained] * len(part)
    return ids, train


def check(tokenizer, messages, segments, policy=None, tools=None):
    ids, train, ok = tokenize_chat(tokenizer, messages, tools, True, policy)
    want_ids, want_train = flags(tokenizer, segments)
    assert tokenizer.decode(ids) == "".join(t for t, _ in segments)
    assert ids == want_ids
    shown = [(tokenizer.decode([i]), t, w) for i, t, w in zip(ids, train, want_train) if t != w]
    assert train == want_train, f"tokens whose flag differs (token, got, want): {shown[:12]}"
    assert ok


def test_templates_are_probed_for_what_they_do_with_reasoning(qwen3, llama31, gpt_oss):
    q, ll, g = template_traits(qwen3), template_traits(llama31), template_traits(gpt_oss)
    assert (q.renders_reasoning, q.keeps_previous, q.gen_prompt) == (True, False, "<|im_start|>assistant\n")
    assert (ll.renders_reasoning, ll.gen_prompt) == (False, "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert (g.renders_reasoning, g.keeps_previous, g.gen_prompt) == (True, False, "<|start|>assistant")
    assert {"<|end|>", "<|return|>", "<|call|>"} <= set(g.closers)


QWEN_TOOL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'


def test_qwen3_default_drops_earlier_reasoning_and_never_trains_tool_results(qwen3):
    # Default = the template's own behaviour: think blocks before the last user turn removed.
    check(qwen3, agent_chat(), [
        ("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n", False),
        (QWEN_TOOL, True),
        ("\n<|im_start|>user\n<tool_response>\n18C sunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
        ("Sunny, 18C.<|im_end|>", True),
        ("\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>\nBe polite.\n</think>\n\nYou're welcome.<|im_end|>", True),
        ("\n", False),
    ])


def test_qwen3_template_inserted_empty_think_is_not_trained(qwen3):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    check(qwen3, chat, [
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        ("Hello.<|im_end|>", True),
        ("\n", False),
    ])


def test_qwen3_keep_trains_every_think_block_and_mask_trains_none(qwen3):
    chat = agent_chat()[:4] + [{"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "Bye."}]
    head = ("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n", False)
    tool = ("\n<|im_start|>user\n<tool_response>\n18C sunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n", False)
    last = ("\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", False)
    check(qwen3, chat, [
        head, ("<think>\nNeed the tool.\n</think>\n\n\n" + QWEN_TOOL, True), tool,
        ("<think>\nIt is sunny.\n</think>\n\nSunny, 18C.<|im_end|>", True), last, ("Bye.<|im_end|>", True), ("\n", False),
    ], MaskPolicy(reasoning="keep"))
    check(qwen3, chat, [
        head, ("<think>\nNeed the tool.\n</think>\n\n\n", False), (QWEN_TOOL, True), tool,
        ("<think>\nIt is sunny.\n</think>\n\n", False), ("Sunny, 18C.<|im_end|>", True), last,
        ("Bye.<|im_end|>", True), ("\n", False),
    ], MaskPolicy(reasoning="mask"))


def test_qwen3_tool_calls_mask(qwen3):
    chat = agent_chat()[:4]
    check(qwen3, chat, [
        ("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<think>\nNeed the tool.\n</think>\n\n"
         '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', False),
        ("<|im_end|>", True),
        ("\n<|im_start|>user\n<tool_response>\n18C sunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>\nIt is sunny.\n</think>\n\nSunny, 18C.<|im_end|>", True),
        ("\n", False),
    ], MaskPolicy(tool_calls="mask"))


LLAMA_HEAD = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
              "Today Date: 26 Jul 2024\n\n<|eot_id|>")


def test_llama31_reasoning_kept_inline_tool_call_trained_ipython_masked(llama31):
    # Llama 3.1's template has no reasoning field: the think text stays in the content (keep).
    check(llama31, agent_chat(), [
        (LLAMA_HEAD + "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>', True),
        ("<|start_header_id|>ipython<|end_header_id|>\n\n18C sunny<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("<think>\nIt is sunny.\n</think>\n\nSunny, 18C.<|eot_id|>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\nThanks!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
         False),
        ("<think>\nBe polite.\n</think>\n\nYou're welcome.<|eot_id|>", True),
    ])
    check(llama31, [agent_chat()[0], agent_chat()[3]], [
        (LLAMA_HEAD + "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n<think>\nIt is sunny.\n</think>\n\n", False),
        ("Sunny, 18C.<|eot_id|>", True),
    ], MaskPolicy(reasoning="mask"))


GPT_HEAD = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nReasoning: medium\n\n"
            "# Valid channels: analysis, commentary, final.<|end|>")


def test_gpt_oss_channels(gpt_oss):
    # Default drops analysis before the last user turn (as the template does); the last turn's
    # analysis is trained, tool output (functions.* messages) never.
    check(gpt_oss, agent_chat(), [
        (GPT_HEAD + "<|start|>user<|message|>Weather in Paris?<|end|><|start|>assistant", False),
        (' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>', True),
        ("<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>18C sunny<|end|><|start|>assistant",
         False),
        ("<|channel|>final<|message|>Sunny, 18C.<|end|>", True),
        ("<|start|>user<|message|>Thanks!<|end|><|start|>assistant", False),
        ("<|channel|>analysis<|message|>Be polite.<|end|><|start|>assistant<|channel|>final<|message|>You're welcome."
         "<|return|>", True),
    ])
    last = [{"role": "user", "content": "Thanks!"}, agent_chat()[5]]
    check(gpt_oss, last, [
        (GPT_HEAD + "<|start|>user<|message|>Thanks!<|end|><|start|>assistant<|channel|>analysis<|message|>Be polite."
         "<|end|><|start|>assistant", False),
        ("<|channel|>final<|message|>You're welcome.<|return|>", True),
    ], MaskPolicy(reasoning="mask"))


def test_data_inspect_shows_the_policy(tmp_path, qwen3):
    import json

    from mlx_tune.data.inspect import format_row, inspect_rows

    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": [agent_chat()[0], agent_chat()[3]]}) + "\n")
    keep = format_row(inspect_rows(path, qwen3, rows=1, policy=MaskPolicy(reasoning="keep"))[0], colour=False)
    mask = format_row(inspect_rows(path, qwen3, rows=1, policy=MaskPolicy(reasoning="mask"))[0], colour=False)
    assert "[[<think>\nIt is sunny.\n</think>\n\nSunny, 18C.<|im_end|>]]" in keep
    assert "<think>\nIt is sunny.\n</think>\n\n[[Sunny, 18C.<|im_end|>]]" in mask
