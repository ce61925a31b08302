"""Sample-quality metrics, as the paper measures them.

- `inception`: the FID Inception network (PyTorch port of the TF graph): pool_3, mixed_6/conv, logits.
- `fid`: Frechet distance (FID on pool_3, sFID on mixed_6/conv[..., :7]).
- `inception_score`: IS over splits of 5,000.
- `prdc`: ADM's improved precision / recall (k = 3).
- `kdd`: KDD, the kernel distance on DINOv2 ViT-L/14 CLS features (dgm-eval's `kd`).
- `evaluate` / `reference_batch`: the `srdit evaluate` and `srdit reference-batch` commands.
- `npz_io`: streaming reads and writes of ADM-layout `.npz` files.
"""
