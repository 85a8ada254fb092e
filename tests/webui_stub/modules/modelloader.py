"""A1111's downloader: fetch ``url`` into ``model_dir`` unless the file is there already."""

import os
import urllib.request

downloads = []


def load_file_from_url(url, *, model_dir, progress=True, file_name=None, hash_prefix=None):
    os.makedirs(model_dir, exist_ok=True)
    file_name = file_name or os.path.basename(url)
    destination = os.path.abspath(os.path.join(model_dir, file_name))
    if not os.path.exists(destination):
        downloads.append(url)
        partial = destination + ".tmp-download"
        with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
            out.write(response.read())
        os.replace(partial, destination)
    return destination
