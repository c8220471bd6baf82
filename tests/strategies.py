"""Hypothesis strategies several property tests share: what callers may send, tricky or not."""

from __future__ import annotations

from hypothesis import strategies as st

# Characters that matter to headers and address parsing, mixed with anything at all.
TRICKY = st.sampled_from(
    [
        "\r",
        "\n",
        "\r\n",
        "\x00",
        "=?",
        "?=",
        "@",
        ",",
        ";",
        '"',
        "<",
        ">",
        "(",
        ")",
        "\\",
        " ",
        "\t",
        ":",
        ".",
        "..",
        "\u2028",
        "\x85",
        "é",
        "=?utf-8?q?",
        "?=\r\n",
        "Bcc: x@evil.com",
    ]
)
TEXT = st.lists(st.one_of(TRICKY, st.text(max_size=8)), max_size=12).map("".join)
ATOM = st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,10}", fullmatch=True)
LABEL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,8}[A-Za-z0-9])?", fullmatch=True)
PLAIN_ADDRESS = st.builds(
    lambda local, labels: f"{'.'.join(local)}@{'.'.join(labels)}",
    st.lists(ATOM, min_size=1, max_size=3),
    st.lists(LABEL, min_size=2, max_size=4),
)
ADDRESS = st.one_of(PLAIN_ADDRESS, st.emails(), TEXT, st.builds("{}@{}".format, TEXT, TEXT))
CODE = st.one_of(st.text(max_size=140), TEXT, st.from_regex(r"[0-9A-Z]{4,12}", fullmatch=True))
