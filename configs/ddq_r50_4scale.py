"""DDQ-DETR, ResNet-50, 4 feature levels, 12 epochs on COCO.

The reference's ``configs/ddq/ddq-detr-4scale_r50_8xb2-12e_coco.py``
(mmdetection 3.3.0): 52.0 box AP on COCO val2017 for its published weights.
Every size of the model is read from this config; nothing is hard-coded.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'ddq_r50_4scale'

  # ---- model -----------------------------------------------------------
  c.num_classes = 80
  # Label names (empty: COCO's for 80 classes, else 'class_<i>').
  c.class_names = ()
  c.embed_dims = 256
  c.num_heads = 8
  c.num_levels = 4            # feature levels seen by the transformer
  c.num_points = 4            # sampling points per head and level
  c.num_encoder_layers = 6
  c.num_decoder_layers = 6
  c.ffn_dims = 2048
  c.num_queries = 900         # distinct (matching) queries
  c.dense_topk_ratio = 1.5    # dense queries = int(num_queries * ratio)
  c.nms_iou_threshold = 0.8   # distinct-query selection (encoder and decoder)
  # Static pre-selection for the encoder-level NMS: the top `nms_pre_topk`
  # proposals by score enter the exact greedy NMS.  The result equals the
  # reference whenever its last kept box ranks within this many.
  c.nms_pre_topk = 4000
  # 'row0': the reference's behaviour (the head reads row 0 of the inverted
  # self-attention mask; published weights were trained with it).
  # 'kept_set': the head reads the set actually kept by each layer's NMS.
  c.distinct_mask_semantics = 'row0'
  c.max_per_img = 300         # detections kept after post-processing
  # Inference (predict, evaluate, the training loop's periodic evaluation)
  # gives each image its batch-1 unpadded result on any canvas: activations,
  # GroupNorm statistics, level masks and the encoder's top-k are confined
  # to the image's own extent.  False: the reference's batched padding
  # (its outputs depend on the canvas and the other images of the batch).
  # Training always follows the reference (docs/PADDING.md).
  c.padding_invariant = True

  c.pos_temperature = 20.0    # sine encoding of the feature maps
  c.pos_offset = 0.0

  c.backbone = ml_collections.ConfigDict()
  c.backbone.type = 'resnet'
  c.backbone.depth = 50
  c.backbone.base_channels = 64
  c.backbone.out_indices = (1, 2, 3)
  c.backbone.frozen_stages = 1  # stem + first stage get no gradient
  c.backbone.zero_init_residual = True  # each block's last norm starts at 0
  c.backbone.bn_trainable = False  # True: train the norms' scale and bias

  c.neck = ml_collections.ConfigDict()
  c.neck.num_groups = 32        # GroupNorm groups
  c.neck.kernel_size = 1

  c.dn = ml_collections.ConfigDict()
  c.dn.num_dn_queries = 100
  c.dn.label_noise_scale = 0.5
  c.dn.box_noise_scale = 1.0

  # ---- losses ----------------------------------------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.cls_weight = 1.0       # sigmoid focal loss
  c.loss.focal_alpha = 0.25
  c.loss.focal_gamma = 2.0
  c.loss.bbox_weight = 5.0      # L1
  c.loss.iou_weight = 2.0       # GIoU
  c.loss.match_cls_weight = 2.0
  c.loss.match_bbox_weight = 5.0
  c.loss.match_iou_weight = 2.0
  c.loss.aux_num_pos = 4        # 1-to-k assignment of the dense queries
  c.loss.aux_alpha = 1.0
  c.loss.aux_beta = 6.0
  # 'auto': scipy (host callback) on one CPU device, the pure-JAX solver on
  # accelerators and multi-device meshes; or force 'scipy' / 'jax'.
  c.loss.hungarian_solver = 'auto'
  c.loss.max_gt = 100           # static ground-truth slots per image

  # ---- data ------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.source = 'synthetic'   # 'synthetic' | 'coco_dir' | 'tfds'
  c.data.coco_dir = ''
  c.data.tfds_name = 'coco/2017'
  c.data.tfds_data_dir = ''
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.mean = (123.675, 116.28, 103.53)  # RGB
  c.data.std = (58.395, 57.12, 57.375)
  c.data.test_scale = (1333, 800)          # (long side max, short side)
  c.data.train_scales = tuple((s, 1333) for s in range(480, 801, 32))
  c.data.crop_scales = ((400, 4200), (500, 4200), (600, 4200))
  c.data.crop_size = (384, 600)
  # Static canvases (h, w): every batch is padded to the smallest that fits.
  c.data.canvas_sizes = ((800, 1344), (1344, 800), (1344, 1344))
  # Evaluation canvases (empty: canvas_sizes).  Every test-resized image
  # (short side <= 800, long <= 1333) fits (800, 1333) or (1333, 800), so an
  # evaluation compiles at most 3 shapes; (800, 1067) holds COCO's most
  # common 4:3 landscape images exactly.  Padding overhead (canvas area /
  # image area) on a COCO-like size mix: 1.09 (canvas_sizes: 1.20); see
  # docs/PADDING.md.  With padding_invariant no stride needs to divide them.
  c.data.eval_canvas_sizes = ((800, 1067), (800, 1333), (1333, 800))
  c.data.num_workers = 4
  c.data.synthetic_size = 256
  c.data.synthetic_num_train = 2000
  c.data.synthetic_num_eval = 200
  c.data.synthetic_seed = 0          # synthetic content (not the train seed)
  c.data.synthetic_num_classes = 8   # shape classes (<= num_classes, <= 8)
  c.data.synthetic_max_objects = 6
  c.data.train_min_size = 32         # mmdet filter_cfg min_size (train only)
  # Explicit COCO paths (override coco_dir/<split>2017 and
  # coco_dir/annotations/instances_<split>2017.json when set).
  c.data.train_image_dir = ''
  c.data.train_ann_file = ''
  c.data.eval_image_dir = ''
  c.data.eval_ann_file = ''
  c.data.tfds_ann_file = ''          # instances JSON for metrics with tfds
  # .npz of (image id, size) per TFDS record, built once if absent ('{split}'
  # is filled in); lets TFDS training group by orientation like coco_dir.
  c.data.tfds_index_file = ''
  # 'static': eval batches use canvas_sizes (few compiles). 'exact': pad each
  # batch only to its largest image rounded up to pad_size_divisor, as the
  # reference (batch 1, pad_size_divisor=1: no padding) - one compile per
  # distinct shape.
  c.data.eval_canvas = 'static'
  c.data.pad_size_divisor = 1

  # ---- optimisation ----------------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-4
  c.optim.weight_decay = 0.05
  c.optim.backbone_lr_mult = 0.1
  # Frozen parameters (no update, no optimiser state): the stem and stages
  # up to backbone.frozen_stages and, unless backbone.bn_trainable, every
  # backbone norm; plus these regexes over parameter paths, e.g. '^neck/'.
  c.optim.frozen_params = ()
  c.optim.clip_norm = 0.1
  # The update on one flat vector per lr group (few, large fused loops: a
  # small compiled step) or per parameter (no flat copies: less peak
  # memory for large models).  Meshes with mesh.model > 1 always update
  # per parameter.  training/flat_optimizer.py.
  c.optim.flat_update = True
  c.optim.warmup_steps = 2000
  c.optim.warmup_factor = 1e-4
  c.optim.epochs = 12
  c.optim.decay_epochs = (11,)
  c.optim.decay_factor = 0.1

  # ---- training loop ---------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 16
  c.train.max_steps = -1          # -1: epochs * steps_per_epoch
  c.train.steps_per_epoch = 0     # used when the data iterator gives none
  c.train.seed = 0
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.eval_every = -1         # -1: once per epoch
  c.train.init_from = ''          # converted checkpoint dir, or torchvision .pth
  # True: init_from's tensors the model has no place for, or of another
  # shape (e.g. another num_classes when fine-tuning), are dropped (listed
  # in the log) and the model's missing ones stay at init; False: any
  # mismatch stops the run (exit 2).
  c.train.init_from_partial = False
  c.train.compute_dtype = 'float32'  # or 'bfloat16' (parameters stay fp32)
  c.train.max_nonfinite_steps = 10   # stop (exit 3) after this many in a row
  c.train.inject_nan_at_steps = ()   # test hook: NaN images at these steps
  c.train.resume_may_change = ()     # extra config keys a resume may change
  # Rematerialisation per part: 'none' | 'minimal' | 'full' (see
  # ddq_jax/model/remat.py); values and gradients do not depend on it.
  c.train.remat = ml_collections.ConfigDict()
  c.train.remat.encoder = 'full'    # each encoder layer
  c.train.remat.decoder = 'full'    # each decoder layer
  c.train.remat.backbone = 'full'   # each trainable ResNet block
  # Trace identical encoder layers once (scan over their parameters).
  c.train.scan_layers = True
  # 'config': scan_layers and remat as written above.  'auto': compile the
  # step for each layer plan, fastest first (unrolled without remat ...
  # scanned with full remat), and train with the first whose compiled peak
  # fits memory_budget_gb per device (0: the device's memory); see
  # ddq_jax/train/memory_plan.py.
  c.train.memory = 'config'
  c.train.memory_budget_gb = 0.0

  # ---- parallelism -----------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                # -1: all devices on the data axis
  c.mesh.model = 1                # >1: shard large parameters on 'model'
  # Partition rules for parameters and optimiser state (parallel/sharding.py):
  # (regex over 'params/backbone/...', 'replicate' | 'largest_axis' |
  # 'fsdp'), first match wins; 'largest_axis' splits leaves of >=
  # min_shard_size elements on 'model'; 'fsdp' splits them over every device
  # (parameters, gradients and moments rest sharded: big models on pods).
  c.mesh.partition_rules = (('.*', 'largest_axis'),)
  c.mesh.min_shard_size = 2 ** 14

  # ---- evaluation ------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 8
  # At each evaluation of a training run: the detections on this many
  # held-out images, drawn at scores >= draw_score_threshold, go to
  # WORKDIR/drawings/step_N/*.png and TensorBoard (0: none).
  c.eval.num_drawn_images = 4
  c.eval.draw_score_threshold = 0.3
  c.eval.max_images = 0           # images per evaluation (0: all)
  return c
