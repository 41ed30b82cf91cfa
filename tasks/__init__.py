"""Built-in tasks, one file per task family; importing this package registers them.

``label_skew`` and ``domain_shift`` hold the protocols that the task files share.
"""

from fedbench.tasks import cifar, domainnet, glimpse_mnist, mnist, pacs, rotated_mnist  # noqa: F401
