"""Talk to a fine-tuned model in the terminal.

    python -m sftfast.chat --base-dir runs/demo                 # interactive, keeps the history
    python -m sftfast.chat --base-dir runs/demo -p "Spell apple"   # one answer, then exit
    python -m sftfast.chat --source base -t 0.0                   # greedy, from a base checkpoint

Interactive commands: `clear` starts a new conversation, `quit` / `exit` (or Ctrl-D) ends.
The conversation is kept as tokens exactly as the renderer lays them out (<|bos|>,
<|user_start|> ... <|user_end|>, <|assistant_start|> ... <|assistant_end|>), so calculator
calls and their forced outputs stay in the history the model sees on the next turn.
Calculator calls are shown inline as [calculator: EXPR = RESULT].
"""

from __future__ import annotations

import argparse
import codecs
import sys

import torch

from sftfast.cli import at_least
from sftfast.engine import Engine, add_checkpoint_arguments, load_for_inference


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m sftfast.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p)
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    p.add_argument("-t", "--temperature", type=at_least(0.0, float), default=0.6,
                   help="sampling temperature, 0 = greedy (default: 0.6)")
    p.add_argument("-k", "--top-k", type=at_least(0), default=50,
                   help="sample among the k most likely tokens, 0 = all (default: 50)")
    p.add_argument("-m", "--max-tokens", type=at_least(0), default=512, help="most tokens per reply (default: 512)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed; turn i uses seed + i (default: 42)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads (1 is fastest on a busy small CPU)")
    return p.parse_args(argv)


class Chat:
    """A conversation as tokens, and the engine that extends it."""

    def __init__(self, engine: Engine, tokenizer, temperature: float, top_k: int, max_tokens: int, seed: int):
        self.engine, self.tok = engine, tokenizer
        self.temperature, self.top_k, self.max_tokens, self.seed = temperature, top_k, max_tokens, seed
        sid = tokenizer.special_token_id
        self.user_start, self.user_end = sid("<|user_start|>"), sid("<|user_end|>")
        self.assistant_start, self.assistant_end = sid("<|assistant_start|>"), sid("<|assistant_end|>")
        self.python_start, self.python_end = sid("<|python_start|>"), sid("<|python_end|>")
        self.output_start = sid("<|output_start|>")
        # how the tool tokens print; any other special token the model emits prints as nothing
        # (its text, "<|user_end|>", is not something the model said)
        self.shown = {**{i: "" for i in tokenizer.special_tokens.values()},
                      self.python_start: "[calculator: ", self.output_start: " = ", sid("<|output_end|>"): "]"}
        self.clear()

    def clear(self) -> None:
        self.tokens = [self.tok.bos_id]
        self.turn_starts: list[int] = []  # where each user turn begins in self.tokens
        self.turn = 0

    def _fit(self, message: list[int]) -> int:
        """How many of the oldest turns to forget so that <|bos|> + the rest of the history +
        `message` leave the model (positions up to its rotary limit) room to answer. Changes
        nothing; raises ValueError when the message alone is too long."""
        limit = getattr(self.engine.model, "rotary_seq_len", None)
        if limit is None:
            return 0
        room = min(self.max_tokens, limit // 4)  # what the reply needs, at least
        if 1 + len(message) + room > limit:
            raise ValueError(f"the message is {len(message)} tokens; this model holds {limit} positions "
                             f"with {room} kept for the reply")
        dropped = 0
        while 1 + len(self.tokens) - self._cut(dropped) + len(message) + room > limit:
            dropped += 1
        return dropped

    def _cut(self, turns: int) -> int:
        """Where the history continues once its `turns` oldest turns are forgotten (1: after <|bos|>)."""
        if turns == 0:
            return 1
        return self.turn_starts[turns] if turns < len(self.turn_starts) else len(self.tokens)

    def reply(self, user_text: str, out=sys.stdout) -> str:
        """Append the user's message, stream the model's reply to `out`, return the reply text.
        The history changes only once the reply is complete: a failure leaves it as it was."""
        message = [self.user_start, *self.tok.encode(user_text), self.user_end, self.assistant_start]
        dropped = self._fit(message)
        cut = self._cut(dropped)
        history = self.tokens[:1] + self.tokens[cut:]
        prompt = history + message
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces = []
        generated = []
        in_python = False  # inside <|python_start|> ... <|python_end|>
        after_python = False  # just after <|python_end|>: " = " follows if an output is forced, else "]"
        for column, _ in self.engine.generate(prompt, num_samples=1, max_tokens=self.max_tokens,
                                              temperature=self.temperature, top_k=self.top_k,
                                              seed=self.seed + self.turn):
            token = column[0]
            if token in (self.assistant_end, self.tok.bos_id):
                break
            generated.append(token)
            text = "]" if after_python and token != self.output_start else ""
            after_python = token == self.python_end
            in_python = (in_python or token == self.python_start) and token != self.python_end
            if token in self.shown:
                text += decoder.decode(b"", final=True) + self.shown[token]
                decoder.reset()
            else:
                text += decoder.decode(self.tok.decode_bytes([token]))
            pieces.append(text)
            out.write(text)
            out.flush()
        tail = decoder.decode(b"", final=True) + ("]" if in_python or after_python else "")
        if in_python:  # cut off (max tokens) inside a calculator call: close it in the history too
            generated.append(self.python_end)
        pieces.append(tail)
        out.write(tail + "\n")
        out.flush()
        # Close the turn as the renderer would, so the next turn sees a well-formed history.
        if dropped:
            print(f"(the conversation is too long for the model: forgot the {dropped} oldest turn(s))", file=sys.stderr)
        self.turn_starts = [t - cut + 1 for t in self.turn_starts[dropped:]] + [len(history)]
        self.tokens = prompt + generated + [self.assistant_end]
        self.turn += 1
        return "".join(pieces)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer, meta = load_for_inference(args.base_dir, args.source, args.model_tag, args.step,
                                                    device=args.device, tokenizer_path=args.tokenizer)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # CheckpointError is a RuntimeError
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    chat = Chat(Engine(model, tokenizer), tokenizer, args.temperature, args.top_k, args.max_tokens, args.seed)
    if args.prompt is not None:
        try:
            chat.reply(args.prompt)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 become U+FFFD, not a traceback
        sys.stdin.reconfigure(errors="replace")
    print(f"sftfast chat: {meta.get('checkpoint_dir')} step {meta.get('step')}. "
          "Type 'clear' for a new conversation, 'quit' to exit.")
    while True:
        try:
            line = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.lower() in ("quit", "exit"):
            return 0
        if line.lower() == "clear":
            chat.clear()
            print("(new conversation)")
            continue
        if not line:
            continue
        print("\nAssistant: ", end="", flush=True)
        try:
            chat.reply(line)
        except ValueError as e:  # a message too long for the model: say so, keep the session
            print(f"\nerror: {e}", file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C stops this reply; the history is as before it
            print("\n(interrupted: the reply was dropped)")


if __name__ == "__main__":
    sys.exit(main())
