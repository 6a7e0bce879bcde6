"""Chat templates for models that ship none: four named ones, or a ``.jinja`` file.

Base (pre-trained) models usually have no chat template, so chat data cannot be rendered
on them. ``chat_template:`` in the config (``mlx-tune serve --chat-template``) names one:

* ``chatml``  -- ``<|im_start|>role\\ncontent<|im_end|>\\n`` (Qwen, SmolLM, many others), with
  Qwen2.5's tool form (tools in the system turn, ``<tool_call>`` JSON calls), so the
  server can offer tools to a model served with it;
* ``llama3``  -- ``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>``;
* ``gemma``   -- ``<start_of_turn>user|model\\ncontent<end_of_turn>\\n`` (a system message
  is folded into the first user turn, as Gemma 2 / 3 do);
* ``mistral`` -- ``[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]user[/INST]assistant</s>``
  (Mistral Small 3's form);

or a path to a Jinja file. The texts are the families' published templates (without the
tool-calling branches, except ChatML's); ``bos_token`` / ``eos_token`` are guarded with ``or ''`` so a
tokenizer without them renders instead of failing.

The template used in training is stored beside the adapter (``chat_template.jinja``,
named in ``adapter_config.json``); fusing writes it into the fused tokenizer files and
the GGUF ``tokenizer.chat_template`` field, and the server renders an adapter's prompts
with it, so every consumer renders prompts exactly as training did.
"""

from __future__ import annotations

from pathlib import Path

from mlx_tune.errors import UserError

TEMPLATE_FILE = "chat_template.jinja"

# ChatML with Qwen2.5's tool form: tools listed in the system turn, calls written as
# <tool_call>{"name", "arguments"}</tool_call> (mlx-lm's json_tools parser), results in <tool_response>.
CHATML = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}"
    "{%- for tool in tools %}{{- \"\\n\" }}{{- tool | tojson }}{%- endfor %}"
    "{{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3 = (
    "{%- for message in messages %}"
    "{%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{%- if loop.index0 == 0 %}{%- set content = (bos_token or '') + content %}{%- endif %}"
    "{{- content }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

GEMMA = (
    "{{- bos_token or '' }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] | trim + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim }}{{- '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

MISTRAL = (
    "{{- bos_token or '' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + (eos_token or '') }}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

NAMED: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA, "mistral": MISTRAL}
# The token each named template closes a turn with; when the vocabulary has it as one
# token it becomes an end-of-sequence id, so the trained span and generation stop there.
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "mistral": None}


def template_text(value: str) -> str:
    """The Jinja text ``value`` names: one of ``NAMED`` or a readable ``.jinja`` file."""
    if value in NAMED:
        return NAMED[value]
    path = Path(value).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"chat_template: cannot read {path} ({getattr(exc, 'strerror', None) or exc}); "
                        f"give {', '.join(NAMED)} or a readable .jinja file") from None
    if not text.strip():
        raise UserError(f"chat_template: {path} is empty")
    return text


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` (mlx-lm wrapper or Hugging Face tokenizer) can render chats."""
    return bool(getattr(tokenizer, "chat_template", None))


def set_chat_template(tokenizer, text: str, name: str | None = None) -> None:
    """Make ``tokenizer`` render chats with ``text`` (and stop at its end-of-turn token).

    ``name`` (default: the ``NAMED`` template equal to ``text``, if any) picks the
    end-of-turn marker.
    mlx-lm's ``TokenizerWrapper`` forwards both attributes to the Hugging Face tokenizer,
    whose ``save_pretrained`` then writes the template with the other tokenizer files.
    """
    tokenizer.chat_template = text
    tokenizer.has_chat_template = True
    name = name or next((k for k, v in NAMED.items() if v == text), None)
    marker = END_OF_TURN.get(name or "")
    add = getattr(tokenizer, "add_eos_token", None)
    if marker and callable(add) and marker in (tokenizer.get_vocab() or {}):
        add(marker)


def use_chat_template(tokenizer, value: str | None) -> str | None:
    """Apply the config's ``chat_template`` (None: keep the tokenizer's); returns the text used."""
    if not value:
        return None
    text = template_text(value)
    set_chat_template(tokenizer, text, value if value in NAMED else None)
    return text


def require_chat_template(tokenizer, model: str, what: str, option: str = "chat_template:") -> None:
    """One-line UserError when chat data (``what``) meets a tokenizer with no template.

    ``option`` is how the caller's user supplies one (the config key, or a flag)."""
    if not has_chat_template(tokenizer):
        where = " in the config" if option.endswith(":") else ""
        raise UserError(f"{model}: has no chat template, so the chat data in {what} cannot be rendered; "
                        f"set {option} {' | '.join(NAMED)} | PATH.jinja{where} "
                        "(or convert the data to completions / text with data_transform.py --to)")


def write_template(folder: str | Path, text: str) -> Path:
    """Store ``text`` as ``folder/chat_template.jinja`` (atomically)."""
    from mlx_tune.atomic import write_text_atomic

    path = Path(folder) / TEMPLATE_FILE
    write_text_atomic(path, text)
    return path


def read_template(folder: str | Path) -> str | None:
    """The template stored beside an adapter in ``folder``, or None."""
    path = Path(folder) / TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the adapter's chat template ({exc})") from None
