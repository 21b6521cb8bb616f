"""Answers shared by the reward robustness tests: pathological ones and ordinary ones that need math-verify."""

from __future__ import annotations

# Answers sympy cannot grade in bounded time (each measured to run past several seconds unbounded).
PATHOLOGICAL = [
    "9^{9^{9^{9}}}",
    "9^{9^{9}}",
    "2^{-10^{9}}",
    "\\frac{1}{2}^{10^{9}}",
    "x^{9^{9^{9}}}",
    "(10^{6})!",
    "(100!)!",
    "10^{10}!",
    "\\binom{10^{9}}{10^{5}}",
    "(x+1)^{1000}",
    "\\prod_{k=1}^{10^{6}} k",
    "".join(f"(x+{i})" for i in range(1, 120)),  # 725 characters
]
# (answer, ground truth, score): every one needs math-verify (no exact or plain-number shortcut).
NORMAL = [
    ("\\frac{1}{2}", "0.5", 1.0),
    ("\\sqrt{9}", "3", 1.0),
    ("x^2", "x^3", 0.0),
    ("\\frac{3}{4}", "0.75", 1.0),
    ("\\pi \\cdot 2", "2\\pi", 1.0),
    ("(1+x)^{10}", "(x+1)^{10}", 1.0),
    ("9^{9}", "387420489", 1.0),
    ("2^{2024}", "4^{1012}", 1.0),
    ("100!", "99! \\cdot 100", 1.0),
    ("\\frac{5}{4}", "1.3", 0.0),
    ("6-5i", "6 - 4i", 0.0),
    ("\\sqrt{2}", "1.41", 0.0),
    ("[1, 2)", "[1,2]", 0.0),
    ("\\{1, 2\\}", "\\{2,1\\}", 1.0),
    ("-q + p", "p - q", 1.0),
    ("\\frac{\\sqrt{3}}{2}", "\\sin(\\pi/3)", 1.0),
    ("10^{3}", "1000", 1.0),
    ("3x+3", "3(x+1)", 1.0),
]
