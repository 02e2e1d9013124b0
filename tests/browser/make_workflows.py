"""Builds the example workflows in workflows/ with the real ComfyUI frontend.

Each graph below is created in a headless Chromium page through LiteGraph (createNode, connect,
widget values) and saved as `app.graph.serialize()`: the UI format the frontend itself saves.

    python tests/browser/make_workflows.py        (from the pack's folder, with ComfyUI's Python)
    python tests/browser/make_workflows.py NAME   (only the examples named, e.g. 10-photo-add-concept-sd15)

Needs what the browser tests need (a ComfyUI host, playwright, the system's Chromium).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))  # comfy_server
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # harness

from harness.pack import concept_inputs  # noqa: E402

SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
NEG = "blurry, lowres, deformed, watermark, text"

X = [40, 460, 880, 1300, 1720]  # columns
REPLAY_SEEDS = (101, 102, 103, 104)  # 09b-replay-edit: four seeds other than 09a's


class G:
    """A graph spec: nodes (key -> type, pos, widgets, title, size) and links (by input name)."""

    def __init__(self, name: str, note: str):
        self.name, self.nodes, self.links = name, [], []
        self.node("note", "Note", (X[0], -330), {"text": note}, size=(760, 300), title="About this example")

    def node(self, key, type_, pos, widgets=None, title=None, size=None):
        self.nodes.append({"id": key, "type": type_, "pos": list(pos), "widgets": widgets or {},
                           "title": title, "size": list(size) if size else None})
        return key

    def link(self, src, slot, dst, input_name):
        self.links.append([src, slot, dst, input_name])

    def text(self, key, text, pos, title=None, clip="ckpt"):
        self.node(key, "CLIPTextEncode", pos, {"text": text}, title=title, size=(400, 130))
        self.link(clip, 1, key, "clip")
        return key

    def base(self, prompt, ckpt=SD15, width=512, height=512, batch=1, negative=NEG):
        self.node("ckpt", "CheckpointLoaderSimple", (X[0], 80), {"ckpt_name": ckpt}, size=(360, 100))
        self.text("pos", prompt, (X[1], 0), title="Prompt")
        self.text("neg", negative, (X[1], 180), title="Negative prompt")
        if width:
            self.node("latent", "EmptyLatentImage", (X[0], 260),
                      {"width": width, "height": height, "batch_size": batch})

    def concept(self, key, text, pos, **w):
        self.text(key + "_text", text, pos, title=f"Concept: {text}")
        widgets = concept_inputs(label=text, **w)
        self.node(key, "SEGAConcept", (pos[0] + 420, pos[1]), widgets)
        self.link(key + "_text", 0, key, "conditioning")
        return key

    def sega_ksampler(self, pos, seed, concepts="concept", latent="latent", steps=50, denoise=1.0, key="sampler"):
        self.node(key, "SEGAKSampler", pos, {"seed": seed, "control_after_generate": "fixed", "steps": steps,
                                             "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
                                             "denoise": denoise, "momentum_scale": 0.1, "momentum_beta": 0.4})
        self.link("ckpt", 0, key, "model")
        self.link("pos", 0, key, "positive")
        self.link("neg", 0, key, "negative")
        self.link(latent, 0, key, "latent_image")
        if concepts:
            self.link(concepts, 0, key, "concepts")
        return key

    def ksampler(self, key, pos, model, seed, latent="latent", steps=50, denoise=1.0):
        self.node(key, "KSampler", pos, {"seed": seed, "control_after_generate": "fixed", "steps": steps,
                                         "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
                                         "denoise": denoise})
        self.link(model[0], model[1], key, "model")
        self.link("pos", 0, key, "positive")
        self.link("neg", 0, key, "negative")
        self.link(latent, 0, key, "latent_image")
        return key

    def photo(self, ckpt=SD15, image="example.png", steps=30, skip=0.15, seed=0):
        """A photo inverted for editing: Load Image -> VAE Encode -> SEGA Invert Photo, with an
        empty-text CLIP Text Encode as the uncond (LEDITS++'s \"\")."""
        self.node("ckpt", "CheckpointLoaderSimple", (X[0], 80), {"ckpt_name": ckpt}, size=(360, 100))
        self.node("image", "LoadImage", (X[0], 240), {"image": image}, size=(360, 400))
        self.node("encode", "VAEEncode", (X[1], 260))
        self.link("image", 0, "encode", "pixels")
        self.link("ckpt", 2, "encode", "vae")
        self.text("uncond", "", (X[1], 0), title="Uncond (empty text)")
        self.node("invert", "SEGAInvertPhoto", (X[2], 0),
                  {"steps": steps, "skip": skip, "seed": seed, "control_after_generate": "fixed"}, size=(380, 200))
        for src, name in (("ckpt", "model"), ("encode", "latent"), ("uncond", "uncond")):
            self.link(src, 0, "invert", name)

    def photo_edit(self, pos, concepts="concept", key="edit"):
        """SEGA Photo Edit of the inverted photo with `concepts` (LEDITS++'s combination, exact reconstruction)."""
        self.node(key, "SEGAPhotoEdit", pos, {"combination": "ledits", "reconstruction": "exact"}, size=(340, 140))
        self.link("ckpt", 0, key, "model")
        self.link("invert", 0, key, "inversion")
        self.link(concepts, 0, key, "concepts")
        return key

    def save(self, latent_src, pos, prefix, key="save"):
        self.node(key + "_decode", "VAEDecode", pos)
        self.link(latent_src, 0, key + "_decode", "samples")
        self.link("ckpt", 2, key + "_decode", "vae")
        self.node(key, "SaveImage", (pos[0], pos[1] + 100), {"filename_prefix": prefix}, size=(400, 440))
        self.link(key + "_decode", 0, key, "images")


def workflows() -> list[G]:
    out = []

    g = G("01-add-concept-portrait-sd15", (
        "SEGA: add a concept to a portrait (SD 1.5)\n\n"
        "The prompt makes a portrait; the SEGA Concept 'glasses' (direction add) puts glasses on the same "
        "person while face, pose and background stay. Settings are the paper's: 50 steps, cfg 7.5, "
        "edit_scale 5, threshold 0.9, warm-up 10.\n\n"
        "Try: set edit_scale to 0 to see the image without SEGA (same seed); raise it to 7-10 if the "
        "glasses do not appear, lower it if the face changes. A later warmup (15-20) keeps more of the "
        "original; threshold 0.95 confines the edit to fewer pixels. Other concepts: 'smiling', 'beard', "
        "'hat'.\n\nCheckpoint: any SD 1.5 model."))
    g.base("a photo portrait of a man, looking at the camera, natural light")
    g.concept("concept", "glasses", (X[0], 480))
    g.sega_ksampler((X[2], 0), seed=21)
    g.save("sampler", (X[3], 0), "sega/add-glasses")
    out.append(g)

    g = G("02-remove-concept-street", (
        "SEGA: remove a concept (cars from a street)\n\n"
        "The SEGA Concept 'cars' with direction remove steers the image away from cars while the street "
        "keeps its layout (the paper's negative guidance).\n\n"
        "Try: edit_scale 5-10 (stronger removal); warmup 5 removes earlier, so cars are never drawn, at "
        "the cost of a different layout; warmup 15 keeps the layout closer. Set edit_scale to 0 for the "
        "image with the cars. Other things to remove: 'people', 'text', 'trees'."))
    g.base("a busy city street with cars and shops, daylight, photo")
    g.concept("concept", "cars", (X[0], 480), direction="remove", edit_scale=7.0)
    g.sega_ksampler((X[2], 0), seed=4)
    g.save("sampler", (X[3], 0), "sega/remove-cars")
    out.append(g)

    g = G("03-change-style-keep-composition", (
        "SEGA: change the style, keep the composition\n\n"
        "A style concept ('oil painting, impressionism') pushes every region of the image towards the "
        "style: a low threshold (0.5) lets the edit act on half of each channel, and a warm-up of 15 "
        "steps lets the composition settle before the style comes in.\n\n"
        "Try: warmup 10 (more style, the layout may move) to 25 (less style, same layout); threshold 0.9 "
        "for a local edit instead; other styles: 'watercolor', 'pencil sketch', 'cyberpunk neon'."))
    g.base("a lighthouse on a rocky coast at sunset, photo")
    g.concept("concept", "oil painting, impressionism, brush strokes", (X[0], 480),
              threshold=0.5, warmup=15, edit_scale=6.0)
    g.sega_ksampler((X[2], 0), seed=11)
    g.save("sampler", (X[3], 0), "sega/style")
    out.append(g)

    g = G("04-several-concepts-stack", (
        "SEGA: several concepts with different weights, scales and windows (SEGA Concept Stack)\n\n"
        "Three concepts act on one portrait, each in its own window of steps (warmup .. cooldown) and "
        "with its own strength: 'smiling' (add, scale 5, steps 10-50), 'glasses' (add, scale 6, weight "
        "1.5, steps 10-30), 'beard' (remove, scale 4, weight 0.5, steps 5-50). The stack collects them "
        "in order; a new input appears when you connect one. Weights are relative among concepts.\n\n"
        "Try: set one concept's edit_scale or weight to 0 to switch it off; move a window (a cooldown "
        "of 30 stops 'glasses' there and saves its model rows for the last 20 steps); too many strong "
        "concepts at once burn the image: lower the scales."))
    g.base("a photo portrait of an old man with a beard, studio light")
    g.concept("c_smile", "smiling", (X[0], 480), edit_scale=5.0)
    g.concept("c_glasses", "glasses", (X[0], 780), edit_scale=6.0, weight=1.5, cooldown=30)
    g.concept("c_beard", "beard", (X[0], 1080), direction="remove", edit_scale=4.0, weight=0.5, warmup=5)
    g.node("stack", "SEGAConceptStack", (X[2], 480))
    g.link("c_smile", 0, "stack", "concepts.concepts0")
    g.link("c_glasses", 0, "stack", "concepts.concepts1")
    g.link("c_beard", 0, "stack", "concepts.concepts2")
    g.sega_ksampler((X[2], 0), seed=8, concepts="stack")
    g.save("sampler", (X[3], 0), "sega/stack")
    out.append(g)

    g = G("05-apply-ksampler-hires-fix", (
        "SEGA Apply with the stock KSampler, and a hires-fix pass\n\n"
        "SEGA Apply patches the MODEL, so any sampler node samples with SEGA: here ComfyUI's KSampler "
        "makes the 512x512 image with 'glasses', the latent is upscaled 1.5x and a second KSampler on the "
        "same patched model refines it at denoise 0.5. SEGA counts steps per run: the second pass has 20 "
        "steps at denoise 0.5, of which the concept's warm-up (10) skips the first half.\n\n"
        "Try: feed the second KSampler from Load Checkpoint directly to refine without SEGA; lower "
        "warmup to 0 for a stronger edit in the second pass. SEGA Apply also works before or after "
        "other model patches (LoRA, RescaleCFG, PAG)."))
    g.base("a photo portrait of a woman in a garden")
    g.concept("concept", "glasses", (X[0], 480))
    g.node("apply", "SEGAApply", (X[2], 480), {"momentum_scale": 0.1, "momentum_beta": 0.4})
    g.link("ckpt", 0, "apply", "model")
    g.link("concept", 0, "apply", "concepts")
    g.ksampler("sampler", (X[2], 0), ("apply", 0), seed=3)
    g.node("upscale", "LatentUpscaleBy", (X[3], 0), {"upscale_method": "nearest-exact", "scale_by": 1.5})
    g.link("sampler", 0, "upscale", "samples")
    g.ksampler("hires", (X[3], 140), ("apply", 0), seed=3, latent="upscale", steps=20, denoise=0.5)
    g.save("hires", (X[4], 0), "sega/hires")
    out.append(g)

    g = G("06-guider-sampler-custom-advanced", (
        "SEGA Guider with SamplerCustomAdvanced\n\n"
        "SEGA Guider is a GUIDER (cfg + SEGA) for SamplerCustomAdvanced: pick the noise, the sampler and "
        "the sigmas yourself. Here: 'glasses' on a portrait, euler, 50 steps of the normal scheduler.\n\n"
        "Try: another sampler in KSamplerSelect (dpmpp_2m, heun: SEGA counts scheduler steps, not model "
        "calls), another scheduler (karras), or SplitSigmas for a partial run."))
    g.base("a photo portrait of a man, looking at the camera, natural light")
    g.concept("concept", "glasses", (X[0], 480))
    g.node("guider", "SEGAGuider", (X[2], 0), {"cfg": 7.5, "momentum_scale": 0.1, "momentum_beta": 0.4})
    for src, slot, name in (("ckpt", 0, "model"), ("pos", 0, "positive"), ("neg", 0, "negative"),
                            ("concept", 0, "concepts")):
        g.link(src, slot, "guider", name)
    g.node("noise", "RandomNoise", (X[2], 220), {"noise_seed": 21, "control_after_generate": "fixed"})
    g.node("select", "KSamplerSelect", (X[2], 360), {"sampler_name": "euler"})
    g.node("sigmas", "BasicScheduler", (X[2], 460), {"scheduler": "normal", "steps": 50, "denoise": 1.0})
    g.link("ckpt", 0, "sigmas", "model")
    g.node("sampler", "SamplerCustomAdvanced", (X[3], 0))
    for src, name in (("noise", "noise"), ("guider", "guider"), ("select", "sampler"), ("sigmas", "sigmas"),
                      ("latent", "latent_image")):
        g.link(src, 0, "sampler", name)
    g.save("sampler", (X[4], 0), "sega/guider")
    out.append(g)

    g = G("07-sdxl", (
        "SEGA with SDXL\n\n"
        "The same graph on SDXL base at 1024x1024: encode the concept with the checkpoint's CLIP (its "
        "pooled output is used as for the prompt). SDXL often needs a lower edit_scale than SD 1.5: "
        "try 3-5.\n\n"
        "Try: 'wearing a red scarf', 'snowing'; warmup 10-15 of 50 keeps the composition. Works with "
        "SDXL fine-tunes and with other families (SD3, Flux) through the same nodes."))
    g.base("a photo of a dog sitting on a park bench, autumn", ckpt=SDXL, width=1024, height=1024)
    g.concept("concept", "wearing a red scarf", (X[0], 480), edit_scale=4.0)
    g.sega_ksampler((X[2], 0), seed=5)
    g.save("sampler", (X[3], 0), "sega/sdxl")
    out.append(g)

    g = G("08-img2img", (
        "SEGA on img2img (denoise below 1)\n\n"
        "Load an image, encode it, and sample at denoise 0.6: only the last 60% of the 50 steps run, and "
        "SEGA counts its warm-up in the steps of this run (here 5 of 30). Concept: 'smiling'.\n\n"
        "Try: denoise 0.4-0.5 keeps more of the photo; 0.7-0.8 lets the concept change more. Load your "
        "own image in Load Image (any size; SD 1.5 prefers about 512 px)."))
    g.base("a photo portrait of a person", width=None)
    g.node("image", "LoadImage", (X[0], 260), {"image": "example.png"}, size=(360, 360))
    g.node("encode", "VAEEncode", (X[1], 380))
    g.link("image", 0, "encode", "pixels")
    g.link("ckpt", 2, "encode", "vae")
    g.concept("concept", "smiling", (X[0], 700), warmup=5)
    g.sega_ksampler((X[2], 0), seed=1, latent="encode", denoise=0.6)
    g.save("sampler", (X[3], 0), "sega/img2img")
    out.append(g)

    g = G("13-typed-concepts-sega-prompt", (
        "SEGA Prompt: the prompt and its concepts typed in one box\n\n"
        "The first line is the prompt; each line starting with + adds a concept, - removes one. Settings follow "
        "the concept's text: :6 is the edit scale, thr=0.95 the threshold, w=0.5 the weight, @0.2- the window "
        "(from 20% of the steps to the end; @10-30 gives steps). Defaults are SEGA Concept's (:5 thr=0.9 w=1 "
        "@10-). Lines starting with # are comments. The same concepts wired through CLIP Text Encode and SEGA "
        "Concept give the same image bit for bit.\n\n"
        "Try: add '+ smiling :5' on a new line; change @0.2- to @0.4- (later: closer to the image without "
        "the concept); '(red hat:1.2)' weighting works as in CLIP Text Encode. A mistake is reported with its "
        "line and column before anything runs.\n\nCheckpoint: any SD 1.5 model."))
    g.node("ckpt", "CheckpointLoaderSimple", (X[0], 80), {"ckpt_name": SD15}, size=(360, 100))
    g.node("prompt", "SEGAPrompt", (X[1], 0), {"text": (
        "a photo portrait of a man, looking at the camera, natural light\n"
        "+ glasses :6 @0.2-\n"
        "- beard :4 w=0.5 @0.1-\n"
        "# '+' adds a concept, '-' removes one")}, title="SEGA Prompt", size=(520, 200))
    g.link("ckpt", 1, "prompt", "clip")
    g.text("neg", NEG, (X[1], 260), title="Negative prompt")
    g.node("latent", "EmptyLatentImage", (X[0], 260), {"width": 512, "height": 512, "batch_size": 1})
    g.sega_ksampler((X[2], 0), seed=21, concepts=None)
    g.links = [l for l in g.links if not (l[2] == "sampler" and l[3] == "positive")]
    g.link("prompt", 0, "sampler", "positive")
    g.link("prompt", 1, "sampler", "concepts")
    g.save("sampler", (X[3], 0), "sega/typed")
    out.append(g)

    g = G("09a-save-edit", (
        "SEGA Save Edit (step 1 of 2): record an edit on one seed\n\n"
        "SEGA Save Edit before the sampler records the edit SEGA adds at each step of this run into "
        "output/sega/edit_00001_.safetensors (the number grows with each run). Run this workflow "
        "once, then open 09b-replay-edit: its SEGA Replay Edit adds the recorded edit to four other "
        "seeds (four KSamplers) without computing the concept again (press R in the browser to "
        "refresh its file list).\n\n"
        "The replay run must have the same number of steps (50) and the same latent size (512x512). "
        "Two workflows, because the file must exist before the replay graph can be queued."))
    g.base("a photo portrait of a man, looking at the camera, natural light")
    g.concept("concept", "glasses", (X[0], 480))
    g.node("record", "SEGASaveEdit", (X[1], 380), {"filename_prefix": "sega/edit"})
    g.link("ckpt", 0, "record", "model")
    g.sega_ksampler((X[2], 0), seed=21)
    g.links = [l for l in g.links if not (l[2] == "sampler" and l[3] == "model")]
    g.link("record", 0, "sampler", "model")
    g.save("sampler", (X[3], 0), "sega/recorded")
    out.append(g)

    g = G("09b-replay-edit", (
        "SEGA Replay Edit (step 2 of 2): the recorded edit on four other seeds\n\n"
        "Run 09a-save-edit first. SEGA Replay Edit loads output/sega/edit_00001_.safetensors (choose "
        "the file that run saved) and adds it to every step of the four plain KSamplers here, seeds "
        "101-104 (09a used seed 21), same 50 steps, same 512x512. No concept is computed here, so each "
        "step costs what plain sampling costs.\n\n"
        "Try: strength 0.5 for half the edit, 0 for the images without it, -1 to push the other way."))
    g.base("a photo portrait of a man, looking at the camera, natural light")
    g.node("replay", "SEGAReplayEdit", (X[1], 380),
           {"edit_file": "sega/edit_00001_.safetensors [output]", "strength": 1.0})
    g.link("ckpt", 0, "replay", "model")
    for i, seed in enumerate(REPLAY_SEEDS):
        y = i * 600
        g.ksampler(f"sampler{i + 1}", (X[2], y), ("replay", 0), seed=seed)
        g.save(f"sampler{i + 1}", (X[3], y), f"sega/replayed_seed{seed}", key=f"save{i + 1}")
    out.append(g)

    photo_try = (
        "Load your own photo in Load Image (SD 1.5: about 512 px, sides multiples of 32). The inversion runs "
        "once: change the concept, its edit_scale or threshold and queue again, and only SEGA Photo Edit "
        "runs (ComfyUI's cache keeps the inversion). ")
    g = G("10-photo-add-concept-sd15", (
        "SEGA: add a concept to your own photo (LEDITS++, SD 1.5)\n\n"
        "SEGA Invert Photo inverts the photo (30 steps, skip 0.15: LEDITS++'s defaults); SEGA Photo Edit replays "
        "its noise with the concept 'sunglasses' added, so the rest of the photo stays. Without a concept (or at "
        "edit_scale 0) it gives the photo back exactly. The image is ComfyUI's own input/example.png.\n\n"
        "Try: " + photo_try + "edit_scale 5-10 (stronger), threshold 0.8 (a larger area) to 0.95 (a smaller "
        "one); a source prompt describing the photo (SEGA Invert Photo's source input) can help a large "
        "edit. Other concepts: 'a hat', 'smiling', 'a red dress'.\n\nCheckpoint: any SD 1.5 model."))
    g.photo()
    g.concept("concept", "sunglasses", (X[1], 480), edit_scale=7.0, warmup=0)
    g.photo_edit((X[3], 0))
    g.save("edit", (X[4], 0), "sega/photo-add")
    out.append(g)

    g = G("11-photo-remove-concept-sd15", (
        "SEGA: remove a concept from your own photo (LEDITS++, SD 1.5)\n\n"
        "The same inversion as 10-photo-add-concept-sd15, edited with the concept 'clouds' in direction remove: "
        "the edit steers away from clouds where they are, and the rest of the photo stays. The image is "
        "ComfyUI's own input/example.png.\n\n"
        "Try: " + photo_try + "edit_scale 7-12 for a stubborn object; threshold 0.8 if parts of it remain. "
        "To remove something only in one region, connect a mask to SEGA Concept's mask input. Other things "
        "to remove: 'people', 'text', 'cars'.\n\nCheckpoint: any SD 1.5 model."))
    g.photo()
    g.concept("concept", "clouds", (X[1], 480), direction="remove", edit_scale=8.0, warmup=0)
    g.photo_edit((X[3], 0))
    g.save("edit", (X[4], 0), "sega/photo-remove")
    out.append(g)

    g = G("12-photo-edit-sdxl", (
        "SEGA: edit your own photo with SDXL (LEDITS++)\n\n"
        "SEGA Invert Photo with an SDXL model, 50 steps (the LEDITS++ SDXL default); it sets the noise maps of "
        "the last 3 steps to zero, as LEDITS++ SDXL does, and the photo is still reconstructed exactly. SEGA "
        "Photo Edit adds 'a red scarf'. The image is ComfyUI's own input/example.png.\n\n"
        "Try: " + photo_try.replace("SD 1.5: about 512 px", "SDXL: about 1024 px") + "SDXL often needs a lower "
        "edit_scale than SD 1.5 (3-6). LEDITS++ SDXL measures the concepts against an all-zero uncond: put "
        "ConditioningZeroOut after the empty CLIP Text Encode to do the same.\n\nCheckpoint: SDXL base or a "
        "fine-tune."))
    g.photo(ckpt=SDXL, steps=50)
    g.concept("concept", "a red scarf", (X[1], 480), edit_scale=5.0, warmup=0)
    g.photo_edit((X[3], 0))
    g.save("edit", (X[4], 0), "sega/photo-sdxl")
    out.append(g)
    return out


BUILD_JS = """async (spec) => {
  const L = window.LiteGraph;
  app.graph.clear();
  const made = {};
  for (const n of spec.nodes) {
    const node = L.createNode(n.type);
    if (!node) throw new Error(`no node type ${n.type}`);
    if (n.title) node.title = n.title;
    app.graph.add(node);
    node.pos = n.pos;
    for (const [name, v] of Object.entries(n.widgets)) {
      const w = node.widgets?.find(w => w.name === name);
      if (!w) throw new Error(`${n.type} has no widget ${name}`);
      w.value = v;
    }
    if (n.size) node.size = n.size;
    made[n.id] = node;
  }
  for (const [a, slot, b, name] of spec.links) {
    const dst = made[b];
    const idx = dst.inputs.findIndex(i => i.name === name);
    if (idx < 0) throw new Error(`${dst.type} has no input ${name}: ${dst.inputs.map(i => i.name)}`);
    if (!made[a].connect(slot, dst, idx)) throw new Error(`could not connect ${a}.${slot} -> ${b}.${name}`);
  }
  app.graph.setDirtyCanvas(true, true);
  return app.graph.serialize();
}"""


def main(names=()) -> None:
    """Builds every example, or only those named (e.g. 10-photo-add-concept-sd15)."""
    import conftest  # noqa: F401  (puts the ComfyUI host on sys.path)
    from harness.host import find_comfyui
    from comfy_browser import Server, launch_browser, open_page, prepare_base_dir
    from playwright.sync_api import sync_playwright

    host = find_comfyui()
    out_dir = Path(__file__).resolve().parents[2] / "workflows"
    out_dir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        prepare_base_dir(base, None)
        server = Server(host, base)
        try:
            server.wait_ready()
            with sync_playwright() as p:
                browser = launch_browser(p)
                page = open_page(browser, server)
                for g in workflows():
                    if names and g.name not in names:
                        continue
                    wf = page.evaluate(BUILD_JS, {"nodes": g.nodes, "links": g.links})
                    path = out_dir / f"{g.name}.json"
                    path.write_text(json.dumps(wf, indent=2) + "\n")
                    print(f"wrote {path.name}: {len(wf['nodes'])} nodes, {len(wf['links'])} links")
                browser.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
