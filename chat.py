"""
The chat template: a conversation -> token ids and a loss mask, and the prompt a reply follows.

Used by data.py (midtraining and SFT rows), evals.py, and the chats of tinychat.py and serve.py; it
takes any tokenizer with encode(), special_id() and bos_id (a bpe.Tokenizer) and imports no project
module. Returns plain Python lists.

Design:
- nanochat's layout: <|bos|>, then each turn between its start and end special tokens; an
  assistant turn may hold parts: text, a calculator call (python) and the tool's answer
  (python_output), each python part between <|python_start|> and <|python_end|>
- the mask marks what the model learns to write (1): the assistant's text and calls and its
  <|assistant_end|>; never the user, the tool's answers or <|assistant_start|>
- a system message has no token of its own (nanochat has none): its text leads the first user
  message
- bad conversations raise ValueError naming the problem, since chats arrive from users (the web
  API) and from datasets alike

Left out on purpose:
- more roles than user and assistant (tool messages, names), and images

References:
- nanochat tokenizer.py (render_conversation): https://github.com/karpathy/nanochat
"""
PART_TYPES = ("text", "python", "python_output")   # kinds of parts in an assistant message


def _check_conversation(conversation) -> list:
    """Validate; return messages with a leading system message merged into the first user turn."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    is_list = isinstance(messages, list) and all(isinstance(m, dict) for m in messages)
    if not is_list or not messages:
        raise ValueError("a conversation must be a dict with a non-empty 'messages' list of dicts")
    if messages[0].get("role") == "system":
        # nanochat has no system token: the system text leads the first user message
        system, user = messages[0].get("content"), len(messages) > 1 and messages[1]
        if not (user and user.get("role") == "user" and isinstance(system, str)
                and isinstance(user.get("content"), str)):
            raise ValueError("a system message must be followed by a user message, both with "
                             "string content")
        messages = [{"role": "user", "content": system + "\n\n" + user["content"]}] + messages[2:]
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role != ("user", "assistant")[i % 2]:
            raise ValueError(f"message {i} has role {role!r}: roles must alternate user, "
                             f"assistant, user, ...")
        if not isinstance(content, str) and (role == "user" or not isinstance(content, list)):
            raise ValueError(f"message {i} ({role}) content must be a string (assistant: or a "
                             f"list of parts)")
        for part in content if isinstance(content, list) else []:
            is_part = isinstance(part, dict) and isinstance(part.get("text"), str)
            if not (is_part and part.get("type") in PART_TYPES):
                raise ValueError(f"message {i} has a bad part {part!r}: "
                                 f"want {{'type': one of {PART_TYPES}, 'text': str}}")
    return messages


def render_conversation(tok, conversation, max_tokens=2048):
    """Conversation -> (ids, mask), cut to max_tokens (None: whole); mask 1 = the model learns it.

    Layout (no separators between special tokens and text):
      <|bos|> <|user_start|> user <|user_end|> <|assistant_start|> reply <|assistant_end|> ...
    Only what the assistant writes is supervised: its text, its python calls including
    <|python_start|> and <|python_end|>, and <|assistant_end|> (so it learns to stop).
    Tool outputs are pasted in by the sampler at run time, so they get mask 0, as do user
    turns and <|assistant_start|> (the sampler writes that one itself). For example:
      ids   <|bos|> <|user_start|> hi <|user_end|> <|assistant_start|> yo <|assistant_end|>
      mask     0          0         0      0               0            1         1
    SFT turns the mask into targets: y = ids[1:] with -1 wherever mask[1:] is 0.
    """
    ids, mask = [], []

    def add(new_ids, supervised):
        ids.extend(new_ids)
        mask.extend([supervised] * len(new_ids))

    def wrap(start, text, end):
        return [tok.special_id(start)] + tok.encode(text) + [tok.special_id(end)]

    add([tok.bos_id], 0)
    for message in _check_conversation(conversation):
        content = message["content"]
        if message["role"] == "user":
            add(wrap("<|user_start|>", content, "<|user_end|>"), 0)
            continue
        add([tok.special_id("<|assistant_start|>")], 0)
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if part["type"] == "text":
                add(tok.encode(part["text"]), 1)
            elif part["type"] == "python":
                add(wrap("<|python_start|>", part["text"], "<|python_end|>"), 1)
            else:
                add(wrap("<|output_start|>", part["text"], "<|output_end|>"), 0)
        add([tok.special_id("<|assistant_end|>")], 1)
    return ids[:max_tokens], mask[:max_tokens]


def render_for_completion(tok, conversation) -> list:
    """Conversation -> prompt ids ending in <|assistant_start|>, for the model to continue.

    As in nanochat, a final assistant message (the reference answer, in evals) is dropped.
    Deviation: a conversation that ends with a user message is used as is (that is what chat
    clients send), and nothing is truncated: the caller knows its context length.
    """
    messages = _check_conversation(conversation)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    ids, _ = render_conversation(tok, {"messages": messages}, max_tokens=None)
    return ids + [tok.special_id("<|assistant_start|>")]
