"""Data: ADM center crop, HDF5 image and latent caches, the training dataset and loader.

Stages: `srdit demo-data` (a small bundled image tree), `srdit prepare` (images -> uint8 HDF5
shards), `srdit encode` (images -> tokenizer latents + teacher features). Training reads the
latent cache through `make_train_loader` (srdit.data.dataset).
"""
