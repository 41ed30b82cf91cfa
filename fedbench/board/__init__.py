"""Reading records and publishing them: validation, the leaderboard, regression checks, comparison.

Modules, each importing only those above it (no cycles):

- ``validate``: is a record trustworthy (schema, hash, location, ranges, consistency);
- ``stats``: mean, std and 95% CI over seeds;
- ``rows``: the data types, ``Row``, ``RankGroup``, ``Table``, ``Board``, ``DivergedRun``;
- ``ranking``: ranks within one headline metric and backbone, ties where intervals overlap, the Pareto front;
- ``published``: published numbers beside the rows whose protocol they match;
- ``grouping``: records -> rows -> rank groups -> tables (which records may be averaged, which
  diverged, chance level, reduced protocols);
- ``cells``: the columns, cell texts and notes the Markdown and HTML tables share;
- ``plots``: the page's SVG plots; ``html``: the static page; ``leaderboard``: Markdown, CSV,
  writing the three files;
- ``compare`` (``fedbench compare``) and ``check`` (``fedbench check``).
"""
