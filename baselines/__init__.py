"""Built-in methods, one file each; importing this package registers them."""

from fedbench.baselines import fedavg, fedclip, fedcmi, fedmmkt, fedprox, local, modality_broadcast, zero_shot  # noqa: F401
