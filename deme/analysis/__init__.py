"""Analysis figures of docs/paper.md §4: pure compute functions (models in, numpy dicts out, saved with
``np.savez(path, **result)``) and plotting functions that read only those .npz files.

Figure -> compute function (module) -> plotting function in ``figures``:

- Fig. 1(a): ``gradsim.compute_gradsim`` -> ``fig1a``. Cosine of the eps-MSE gradients across timesteps
  (same images and noise for every t, optional Johnson-Lindenstrauss sketch).
- Fig. 2: ``activations.compute_activations`` -> ``fig2``. Channel vs spatial activation change between
  the pretrained and a finetuned model, at every down/mid/up block output.
- Fig. 4: ``landscape.compute_landscape`` -> ``fig4``. Loss on the filter-normalised random plane, one
  surface per timestep range.
- Fig. 6(a): ``taskvec.compute_planes`` -> ``fig6a``. Loss on the plane of two task vectors, with theta,
  theta_a, theta_b and the merged model's projection.
- Fig. 6(b): ``taskvec.compute_layer_stats`` -> ``fig6b``. Per-layer quantiles of tau and |tau|, per
  interval model and pooled low vs high noise.
- Fig. 7: ``taskvec.compute_cosines`` -> ``fig7``. Task-vector cosine matrix, overall and per layer,
  with the seed noise floor.
- x̂0 sequence view (reviewer 2): ``sequence.compute_sequence`` -> ``fig_sequence``. x̂0 at the end of
  each interval for several models from the same initial noise.

Shared pieces: ``landscape`` holds the eps-MSE on a fixed set (``eps_mse``, ``mean_eps_loss``) and the
weight-plane evaluator (``set_weights``, ``swapped_weights``, ``loss_at_points``, ``loss_on_plane``) used
by Fig. 4 and Fig. 6(a). Every function that calls a UNet takes ``cond`` (extra UNet kwargs such as
``encoder_hidden_states``), so the same code serves UNet2DModel and UNet2DConditionModel.
"""
