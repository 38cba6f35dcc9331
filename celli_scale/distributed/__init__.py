"""Distribution: worker processes and ``jax.distributed`` on loopback (:mod:`.launch`),
data-parallel batch evaluation (:mod:`.data_parallel`), spatial subdomains and their halo
(:mod:`.domains`). Import the submodules; this package imports nothing heavy."""
