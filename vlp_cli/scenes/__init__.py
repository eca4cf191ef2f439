"""The embedded "scenes" data set: several easy-VQA shapes per image, where regions matter.

easy-VQA has one shape per image, so its tags and captions never need more than one region.
Here shapes are cut out of the real easy-VQA images (by the coverage `readers.easyvqa`
derives from the pixels) and pasted at free positions and sizes, with some overlap, 2 to 6
per 128x128 canvas (`layout.py`); captions and questions name several objects and their
relations (`language.py`); a simulated detector turns the ground truth into jittered boxes
with class distributions and some wrong tags (`detector.py`). Everything is deterministic
from a seed; train scenes use train easy-VQA images only, test scenes test images only.
The reader (`readers/scenes.py`) makes it a build-corpus source and an image source.
"""
