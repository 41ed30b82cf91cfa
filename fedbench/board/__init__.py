"""Reading records and publishing them: validation, the leaderboard, regression checks, comparison.

Modules, each importing only those above it (no cycles):

- ``validate``: is a record trustworthy (schema, hash, location, ranges, consistency);
- ``stats``: mean, std and 95% CI over seeds;
- ``rows``: the data types, ``Row``, ``Table``, ``Board``;
- ``published``: published numbers beside the rows whose protocol they match;
- ``grouping``: records -> rows -> tables (which records may be averaged);
- ``cells``: the columns and cell texts the Markdown and HTML tables share;
- ``html``: the static page; ``leaderboard``: Markdown, CSV, writing the three files;
- ``compare`` (``fedbench compare``) and ``check`` (``fedbench check``).
"""
