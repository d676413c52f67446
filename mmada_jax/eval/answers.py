"""Final answers of free-form math responses (GSM8K / MATH style), for evaluation and the UniGRPO correctness reward.

`extract_answer(response)` finds the answer in three steps:
  1. Scope: only the text after the last `</think>` when the response has one (the numbers of the reasoning are not
     the answer); the whole response otherwise.
  2. Marker: inside that scope, the content of the last `\\boxed{...}` (nested braces allowed; MATH convention), else
     the text after the last `####` (GSM8K convention), else the whole scope.
  3. Value: a `\\boxed{}` content that is one number (after dropping `\\text{...}` units, `\\%`, `^\\circ` and LaTeX
     spacing) gives that number, any other boxed content its cleaned text (e.g. "x+1"); otherwise the last number of
     the marked text (integers, decimals, `1,234` thousands separators, `$`, a sign, fractions `a/b` and
     `\\frac{a}{b}`) in canonical form (`normalize_number`); a `####` answer without a number gives its stripped text;
     no marker and no number gives None.

Canonical numbers compare exactly: `"1,200"`, `"$1200.00"` and `"1200"` all give "1200"; `"0.5"`, `"1/2"` and
`"\\frac{2}{4}"` all give "1/2" (non-integers are written as reduced fractions).
"""

from __future__ import annotations

import re
from fractions import Fraction

_LATEX_NOISE = re.compile(r"\\(?:text|mbox|mathrm)\{[^{}]*\}|\\[%!,;:]|\^\\circ|\^\{\\circ\}|\\left|\\right")
_FRAC = re.compile(r"\\d?frac\{\s*(-?[\d.,]+)\s*\}\{\s*(-?[\d.,]+)\s*\}")
# A signed number with optional thousands separators and decimals, optionally a fraction "a/b".
_NUMBER = re.compile(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+")


def normalize_number(text: str) -> str | None:
  """Canonical form of one number (`"$1,234.00"` -> "1234", `"-0.50"` -> "-1/2", `"3 / 6"` -> "1/2"); None when
  `text` is not a number."""
  s = _FRAC.sub(lambda m: f"{m.group(1)}/{m.group(2)}", str(text).strip())
  s = s.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
  try:
    if "/" in s:
      num, den = s.split("/", 1)
      value = Fraction(num) / Fraction(den)
    else:
      value = Fraction(s)
  except (ValueError, ZeroDivisionError):
    return None
  return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None when there is none."""
  start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
  if start < 0:
    return None
  i = text.index("{", start) + 1
  depth, j = 1, i
  while j < len(text) and depth:
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    j += 1
  return text[i:j - 1] if depth == 0 else text[i:]


def last_number(text: str) -> str | None:
  """The last number of `text` in canonical form, or None."""
  text = _FRAC.sub(lambda m: f"{m.group(1)}/{m.group(2)}", text)
  for match in reversed(list(_NUMBER.finditer(text))):
    value = normalize_number(match.group())
    if value is not None:
      return value
  return None


def extract_answer(response: str, think_close: str = "</think>") -> str | None:
  """The final answer of a response (module docstring: scope, marker, number); None when it has none.

  Examples: "<think>3+4=7</think>The answer is 7." -> "7"; "... #### 1,200" -> "1200"; "\\boxed{\\frac{1}{2}}" ->
  "1/2"; "<think>2+2=4</think>" -> None (nothing after the reasoning).
  """
  scope = response.rsplit(think_close, 1)[1] if think_close and think_close in response else response
  boxed = last_boxed(scope)
  if boxed is not None:
    cleaned = _LATEX_NOISE.sub("", boxed).strip()
    return normalize_number(cleaned) or cleaned or None
  if "####" in scope:
    marked = scope.rsplit("####", 1)[1]
    return last_number(marked) or marked.strip() or None
  return last_number(scope)


def gold_answer(answer: str) -> str | None:
  """Canonical form of a reference answer: a GSM8K solution (`... #### 42`), a MATH `\\boxed{}` or a bare value."""
  value = extract_answer(answer, think_close="")
  return value if value is not None else (answer.strip() or None)


def is_correct(response: str, answer: str) -> bool:
  """Exact match of `extract_answer(response)` with the canonical reference answer."""
  got = extract_answer(response)
  return got is not None and got == gold_answer(answer)
