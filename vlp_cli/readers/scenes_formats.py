"""The scene set written out in the standard data sets' own formats (vlp export-scenes).

So that every reader and task can be shown to learn on data where regions matter, the scenes
are written as the releases are (readers/ reads them back as it reads the real files):

    images/<id>.jpg                     every scene (JPEG, quality 95), id = scene index + 1
                                        (train) or 100001 + index (test); NLVR2's pairs also
                                        as images/<split>-<set>-0-img0.png and -img1.png
    boxes.jsonl                         the simulated detector's boxes for all of them
    coco/captions_{train,val}2014.json  COCO captions (3 to 5 references per scene)
    vqa/v2_OpenEnded_mscoco_{train,val}2014_questions.json + v2_mscoco_*_annotations.json
                                        VQA v2, each answer given by all ten "annotators"
                                        (so the official soft accuracy is exact match)
    gqa/{train,testdev}_balanced_questions.json   GQA, with structural types
    nlvr2/{train,test1}.json            NLVR2 statements about two scenes
    snli_ve/snli_ve_{train,test}.jsonl  SNLI-VE hypotheses about a scene
    refcoco/refs(unc).p + instances.json  RefCOCO (a protocol-2 pickle of builtin containers,
                                        as released); testA: the class repeats in the scene
                                        (size or a relation needed), testB: it does not
    majority/                           each format's results file of the majority-class
                                        answer (RefCOCO: the largest detected box), scored by
                                        `vlp evaluate TASK --predictions` like any system's
    sources.json                        per data set, the build-corpus sources and references

Train scenes go to the train files, test scenes to the files read as test (`test=` in
sources.json); val is carved from train by the corpus (corpus.val_fraction). Image keys
follow each reader's one rule: `<id>.jpg` is already the key of Flickr30K (SNLI-VE), GQA,
COCO captions and RefCOCO files; VQA v2's `COCO_train2014_<12 digits>.jpg` maps onto it with
`corpus.image_keys="{id}.jpg"`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from vlp_cli.readers import scenes as scene_reader
from vlp_cli.readers.refcoco import write_refs
from vlp_cli.scenes import claims, detector
from vlp_cli.scenes.layout import CLASSES, SEED, SPLIT_INDEX, Scene, render

ID_BASE = {"train": 1, "test": 100001}
STATEMENTS_PER_PAIR = 8  # NLVR2: half true, half false


def image_id(scene: Scene) -> int:
    return ID_BASE[scene.split] + scene.index


def _dump(path: Path, data: object) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


def _lines(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rng(scene: Scene, stream: int) -> np.random.Generator:
    return np.random.default_rng([SEED, SPLIT_INDEX[scene.split], scene.index, stream])


def _majority(out: Path, name: str, train: list[str], rows: Callable[[str], Any]) -> str:
    """The results file that answers every test item with the train split's most common
    value: `rows(value)` gives its content (a CSV's text, or JSON rows)."""
    content = rows(Counter(train).most_common(1)[0][0])
    path = out / "majority" / name
    if isinstance(content, str):
        path.write_text(content)
        return str(path)
    return _dump(path, content)


def write(spec: str, out: Path) -> dict:
    """Write the scenes of `spec` (`scenes` or `scenes:N`) into `out`; returns sources.json."""
    out = Path(out)
    found = scene_reader.scenes(spec)
    by_split = {s: [x for x in found if x.split == s] for s in ("train", "test")}
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    dets = {}
    for scene in found:
        Image.fromarray(render(scene)).save(images / f"{image_id(scene)}.jpg", quality=95)
        dets[scene.key] = detector.boxes_line(scene, detector.detect(scene))
    boxes = [{**dets[s.key], "image": f"{image_id(s)}.jpg"} for s in found]
    sources: dict[str, dict] = {}
    sources["COCO captions"] = _coco_captions(by_split, out)
    sources["VQA v2"] = _vqa(by_split, out)
    sources["GQA"] = _gqa(by_split, out)
    sources["NLVR2"], pair_boxes = _nlvr2(by_split, out, dets)
    sources["SNLI-VE"] = _snli_ve(by_split, out)
    sources["RefCOCO"] = _refcoco(by_split, out, dets)
    _lines(out / "boxes.jsonl", boxes + pair_boxes)
    _dump(out / "sources.json", sources)
    return sources


def _coco_captions(by_split: dict[str, list[Scene]], out: Path) -> dict:
    files, train_caps = {}, []
    for split, subtype in (("train", "train2014"), ("test", "val2014")):
        imgs, anns = [], []
        for scene in by_split[split]:
            caps, _ = scene_reader.language(scene)
            imgs.append({"id": image_id(scene), "file_name": f"{image_id(scene)}.jpg",
                         "width": scene.width, "height": scene.height})
            # COCO's caption ids are unique within a file (pycocotools indexes by them)
            anns += [{"id": len(anns) + k + 1, "image_id": image_id(scene), "caption": c}
                     for k, c in enumerate(caps)]
        files[split] = _dump(out / "coco" / f"captions_{subtype}.json",
                             {"info": {"description": "vlp scenes"}, "images": imgs,
                              "annotations": anns, "type": "captions"})
        if split == "train":
            train_caps = [a["caption"] for a in anns]
        else:
            majority = _majority(out, "captions_results.json", train_caps, lambda common: [
                {"image_id": i["id"], "caption": common} for i in imgs])
    return {"sources": [files["train"], f"test={files['test']}"], "references": files["test"],
            "majority": majority}


def _answer_type(answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other"


def _vqa(by_split: dict[str, list[Scene]], out: Path) -> dict:
    files, train_answers = {}, []
    for split, subtype in (("train", "train2014"), ("test", "val2014")):
        qs, anns = [], []
        for scene in by_split[split]:
            _, qas = scene_reader.language(scene)
            for n, (q, a) in enumerate(qas):
                qid = image_id(scene) * 100 + n
                qs.append({"image_id": image_id(scene), "question": q, "question_id": qid})
                anns.append({"question_id": qid, "image_id": image_id(scene),
                             "question_type": " ".join(q.split()[:2]),
                             "answer_type": _answer_type(a), "multiple_choice_answer": a,
                             "answers": [{"answer": a, "answer_confidence": "yes",
                                          "answer_id": k + 1} for k in range(10)]})
        _dump(out / "vqa" / f"v2_mscoco_{subtype}_annotations.json",
              {"data_subtype": subtype, "annotations": anns})
        files[split] = _dump(out / "vqa" / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
                             {"data_subtype": subtype, "task_type": "Open-Ended",
                              "questions": qs})
        if split == "train":
            train_answers = [a["multiple_choice_answer"] for a in anns]
        else:
            majority = _majority(out, "vqa_results.json", train_answers, lambda common: [
                {"question_id": q["question_id"], "answer": common} for q in qs])
    return {"sources": [files["train"], f"test={files['test']}"],
            "references": str(out / "vqa" / "v2_mscoco_val2014_annotations.json"),
            "majority": majority, "sets": ['corpus.image_keys="{id}.jpg"']}


def _gqa(by_split: dict[str, list[Scene]], out: Path) -> dict:
    files, train_answers = {}, []
    for split, name in (("train", "train"), ("test", "testdev")):
        data = {}
        for scene in by_split[split]:
            for n, (q, a, types) in enumerate(claims.gqa_questions(scene, _rng(scene, 5))):
                data[f"{image_id(scene)}{n:02d}"] = {
                    "question": q, "imageId": str(image_id(scene)), "answer": a,
                    "fullAnswer": a, "isBalanced": True, "types": types,
                    "groups": {"global": None, "local": types["detailed"]},
                    "semantic": [], "entailed": [], "equivalent": []}
        files[split] = _dump(out / "gqa" / f"{name}_balanced_questions.json", data)
        if split == "train":
            train_answers = [v["answer"] for v in data.values()]
        else:
            majority = _majority(out, "gqa_results.json", train_answers, lambda common: [
                {"questionId": k, "prediction": common} for k in data])
    return {"sources": [files["train"], files["test"]], "references": files["test"],
            "majority": majority}


def _nlvr2(by_split: dict[str, list[Scene]], out: Path,
           dets: dict[str, dict]) -> tuple[dict, list[dict]]:
    files, boxes, train_labels = {}, [], []
    for split, name in (("train", "train"), ("test", "test1")):
        scenes = by_split[split]
        rows = []
        for k in range(len(scenes) // 2):
            left, right = scenes[2 * k], scenes[2 * k + 1]
            rng = _rng(left, 6)
            for img, scene in enumerate((left, right)):
                key = f"{name}-{k}-0-img{img}.png"
                Image.fromarray(render(scene)).save(out / "images" / key)
                boxes.append({**dets[scene.key], "image": key})
            wants = [True, False] * (STATEMENTS_PER_PAIR // 2)
            for s, want in enumerate(wants):
                text = claims.nlvr2_statement(left, right, rng, want)
                if text is None:
                    continue
                rows.append({"identifier": f"{name}-{k}-0-{s}", "sentence": text,
                             "label": "True" if want else "False", "left_url": "",
                             "right_url": "", "writer": "vlp-scenes", "synset": "shape",
                             "query": "shapes", "validation": {}})
        files[split] = _lines(out / "nlvr2" / f"{name}.json", rows)
        if split == "train":
            train_labels = [r["label"] for r in rows]
        else:
            majority = _majority(out, "nlvr2_predictions.csv", train_labels, lambda common: "".join(
                f"{r['identifier']},{common}\n" for r in rows))
    return ({"sources": [files["train"], files["test"]], "references": files["test"],
             "majority": majority}, boxes)


def _snli_ve(by_split: dict[str, list[Scene]], out: Path) -> dict:
    files, train_labels = {}, []
    for split in ("train", "test"):
        rows = []
        for scene in by_split[split]:
            name = f"{image_id(scene)}.jpg"
            premise = scene_reader.language(scene)[0][0]
            for n, (hyp, label) in enumerate(claims.ve_hypotheses(scene, _rng(scene, 7))):
                rows.append({"Flikr30kID": name, "sentence1": premise, "sentence2": hyp,
                             "gold_label": label, "pairID": f"{name}#0r{n}{label[0]}",
                             "captionID": f"{name}#0"})
        files[split] = _lines(out / "snli_ve" / f"snli_ve_{split}.jsonl", rows)
        if split == "train":
            train_labels = [r["gold_label"] for r in rows]
        else:
            majority = _majority(out, "snli_ve_results.json", train_labels, lambda common: [
                {"pairID": r["pairID"], "gold_label": common} for r in rows])
    return {"sources": [files["train"], files["test"]], "references": files["test"],
            "majority": majority}


def _refcoco(by_split: dict[str, list[Scene]], out: Path, dets: dict[str, dict]) -> dict:
    refs, images, anns, largest = [], [], [], []
    for split in ("train", "test"):
        for scene in by_split[split]:
            iid = image_id(scene)
            images.append({"id": iid, "file_name": f"{iid}.jpg", "width": scene.width,
                           "height": scene.height})
            for i, text, repeats in claims.referring(scene, _rng(scene, 8)):
                obj = scene.objects[i]
                x1, y1, x2, y2 = obj.box
                ann_id = iid * 10 + i
                anns.append({"id": ann_id, "image_id": iid, "bbox": [x1, y1, x2 - x1, y2 - y1],
                             "category_id": CLASSES.index(obj.name) + 1, "iscrowd": 0,
                             "area": (x2 - x1) * (y2 - y1)})
                sent_id = len(refs)
                refs.append({"ref_id": sent_id, "ann_id": ann_id, "image_id": iid,
                             "category_id": CLASSES.index(obj.name) + 1,
                             "split": "train" if split == "train" else
                             ("testA" if repeats else "testB"),
                             "file_name": f"{iid}_{ann_id}.jpg",
                             "sentences": [{"sent_id": sent_id, "sent": text, "raw": text,
                                            "tokens": text.split()}]})
                if split == "test":
                    b = max(dets[scene.key]["boxes"], key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
                    largest.append({"sent_id": sent_id, "box": [b[0], b[1], b[2] - b[0],
                                                                b[3] - b[1]]})
    path = out / "refcoco" / "refs(unc).p"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_refs(refs, path)  # the release's format, a protocol-2 pickle of builtins
    _dump(out / "refcoco" / "instances.json",
          {"images": images, "annotations": anns,
           "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)]})
    majority = _dump(out / "majority" / "refcoco_results.json", largest)
    return {"sources": [str(path)], "references": f"test={path}", "majority": majority}
