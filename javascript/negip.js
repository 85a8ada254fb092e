// Negative Image Prompt: thumbnails of each side's uploaded image prompts, drawn in the browser
// from the file links gradio shows. A server round trip per upload would break gradio 3.41's
// upload of the other side: a component update that lands while a file is uploading leaves
// that upload at "Uploading..." forever.
(function() {
    function negipShowThumbnails(files, preview) {
        var links = Array.from(files.querySelectorAll("a[download]"), function(a) {
            return a.href;
        });
        var shown = links.join("\n");
        if (preview.dataset.negipShown === shown) return;
        preview.dataset.negipShown = shown;
        preview.replaceChildren.apply(preview, links.map(function(href) {
            var image = document.createElement("img");
            image.src = href;
            image.alt = "";
            image.className = "negip-thumbnail";
            return image;
        }));
    }

    function negipWatch(tab, side) {
        var files = gradioApp().querySelector("#negip_" + tab + "_" + side + "_images");
        // gr.HTML puts its elem_id on the block and on the inner element: draw into the inner.
        var holders = gradioApp().querySelectorAll("#negip_" + tab + "_" + side + "_preview");
        var preview = holders[holders.length - 1];
        if (!files || !preview) return;
        var update = function() {
            negipShowThumbnails(files, preview);
        };
        new MutationObserver(update).observe(files, {
            childList: true, subtree: true, attributes: true, attributeFilter: ["href"]
        });
        update();
    }

    onUiLoaded(function() {
        ["txt2img", "img2img"].forEach(function(tab) {
            ["positive", "negative"].forEach(function(side) {
                negipWatch(tab, side);
            });
        });
    });
})();
