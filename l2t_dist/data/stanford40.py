"""Stanford-40 Actions from the official `StanfordActionDataset.zip`, read in place.

Assumed format (that of the official download): `ImageSplits/actions.txt` starts with the
header `action_name<TAB>number_of_images`, then one `<action><TAB><n>` line per action (any
whitespace is accepted); `ImageSplits/<action>_train.txt` and `<action>_test.txt` list one
image file name (`<action>_<nnn>.jpg`, no folder) per line; the images lie flat in
`JPEGImages/`. The label of an image is the action whose list names it. Labels number the
sorted action names and images come by label, then file name: the ImageFolder order of a
`PATH/<split>/<action>/` copy (see data/listed.py); there is no L2T-ww split file for it.
"""

from __future__ import annotations

from l2t_dist.data.listed import ListedImages

ACTIONS_FMT = "<action> <number_of_images>"
LINE_FMT = "<action>_<nnn>.jpg"


class Stanford40(ListedImages):
    kind = "stanford40"
    FOLDER = "Stanford40"
    IMAGES = "JPEGImages"
    LAYOUT = """PATH/                              (StanfordActionDataset.zip unpacked; or PATH/Stanford40/)
    JPEGImages/<action>_<nnn>.jpg   e.g. JPEGImages/applauding_001.jpg
    ImageSplits/actions.txt         a header line 'action_name number_of_images', then '<action> <number_of_images>'
    ImageSplits/<action>_train.txt  split 'train': one '<action>_<nnn>.jpg' per line, for each action of actions.txt
    ImageSplits/<action>_test.txt   split 'test': the same
    labels: sorted action names; order: by label, then file name (ImageFolder over a PATH/<split>/<action>/ copy)"""

    def _read_classes(self) -> list[str]:
        name = "ImageSplits/actions.txt"
        actions: list[str] = []
        for k, (n, line) in enumerate(self._lines(name, ACTIONS_FMT)):
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit() and parts[0] not in actions:
                actions.append(parts[0])
            elif k or parts[:1] != ["action_name"]:  # only the first line may be the header
                raise self._line_error(f"line {n} of {name}", line, ACTIONS_FMT,
                                       " (after the header 'action_name number_of_images'), each action once")
        if not actions:
            raise self._error(f"{name} lists no actions; expected lines '{ACTIONS_FMT}' after its header")
        return sorted(actions)

    def _listed(self, split: str) -> tuple[list[tuple[str, str]], str]:
        listed = []
        for action in self.classes:
            name = f"ImageSplits/{action}_{split}.txt"
            for n, line in self._lines(name, LINE_FMT):
                if len(line.split()) != 1 or "/" in line:
                    raise self._line_error(f"line {n} of {name}", line, LINE_FMT, " (a file name in JPEGImages/)")
                listed.append((line, action))
        return listed, f"ImageSplits/<action>_{split}.txt"
