"""A fixed list of rows that are not what any review classifier was evaluated on: code, SQL, other languages,
spam, digits only, emoji only, whitespace and zero-width text, and a 5 MB run of one letter. The scope guard must
put every one of them out of scope (benchmarks/scope.py measures `junk_rows_out_of_scope` on the demo's edge
model); the tests check that each is a row `distill predict` accepts, so the guard and not the parser decides."""

from __future__ import annotations

JUNK_ROWS: dict[str, str] = {
    "python": "def main(argv):\n    for i, arg in enumerate(argv):\n        print(f'{i}: {arg}')\n    return 0",
    "javascript": "const x = await fetch('/api/v1/items?limit=10').then(r => r.json()); console.log(x.length);",
    "sql": "SELECT u.id, COUNT(o.id) FROM users u LEFT JOIN orders o ON o.user_id = u.id GROUP BY u.id HAVING "
           "COUNT(o.id) > 3;",
    "shell": "sudo apt-get update && apt-get install -y build-essential && make -j$(nproc) install",
    "json": '{"status": "ok", "items": [{"id": 1, "tags": ["a", "b"]}, {"id": 2, "tags": []}], "next": null}',
    "german": "Der Zug nach München fährt heute wegen Bauarbeiten erst um halb neun vom Gleis sieben ab.",
    "chinese": "今天天气很好，我们一起去公园散步吧，然后去吃晚饭。",
    "russian": "Пожалуйста, отправьте отчёт до конца недели, чтобы мы успели его проверить.",
    "spam": "CONGRATULATIONS!!! You have WON a $1000 gift card. Click http://win.example.com NOW to claim your prize!",
    "digits": "4815162342 0000 1234 5678 9012 3456 77 31415926535",
    "emoji": "😀😀😀 🎉🎉 🚀🔥💯 👍👍👍",
    "whitespace and zero-width": " \u200b\u200b\u200c\u200d\ufeff \u200b ",
    "one letter, 5 MB": "a" * (5 * 1024 * 1024),
}
