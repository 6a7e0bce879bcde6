"""An Ollama ``Modelfile`` beside a GGUF output: FROM, ADAPTER, TEMPLATE, stop tokens.

Ollama's TEMPLATE is a Go template, not Jinja, so a chat template cannot be translated in
general: the families' forms are recognised by their markers (ChatML, Llama 3, Gemma,
Mistral) and written as their Go equivalents, with the end-of-turn token as ``stop``.
Any other template is left out with a comment: Ollama then reads the Jinja template the
GGUF carries (``tokenizer.chat_template``).
"""

from __future__ import annotations

# marker in the Jinja template -> (Go template, stop tokens)
FAMILIES: list[tuple[str, str, str, list[str]]] = [
    ("chatml", "<|im_start|>",
     '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n',
     ["<|im_end|>"]),
    ("llama3", "<|start_header_id|>",
     "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
     "<|start_header_id|>assistant<|end_header_id|>\n\n",
     ["<|eot_id|>"]),
    ("gemma", "<start_of_turn>",
     '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}\n'
     "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
     ["<end_of_turn>"]),
    ("mistral", "[INST]",
     '{{- range .Messages }}{{ if eq .Role "system" }}[SYSTEM_PROMPT]{{ .Content }}[/SYSTEM_PROMPT]'
     '{{ else if eq .Role "user" }}[INST]{{ .Content }}[/INST]{{ else }}{{ .Content }}</s>{{ end }}{{ end }}',
     ["</s>"]),
]


def family(chat_template: str | None) -> str | None:
    for name, marker, _, _ in FAMILIES:
        if chat_template and marker in chat_template:
            return name
    return None


def modelfile(gguf_file: str, chat_template: str | None, *, adapter_file: str | None = None) -> str:
    """The Modelfile text for ``gguf_file`` (a name beside it), optionally with a LoRA ``adapter_file``."""
    lines = [f"FROM ./{gguf_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    name = family(chat_template)
    if name is None:
        lines.append("# TEMPLATE: not a family mlx_tune translates; Ollama reads the GGUF's own chat template")
    else:
        go, stops = next((g, s) for n, _, g, s in FAMILIES if n == name)
        lines.append(f'TEMPLATE """{go}"""')
        lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
