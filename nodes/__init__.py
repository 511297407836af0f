"""graphflow's built-in node library, registered through the `graphflow.nodes` entry point.

Modules here import heavy libraries (torch, cv2) inside `run` only, so that listing and
validating nodes stays fast.
"""

from nodes.adapters import T2IAdapterApply, T2IAdapterLoader
from nodes.annotators import (
    HED,
    MLSD,
    ContentShuffle,
    Lineart,
    LineartAnime,
    LineartStandard,
    MidasDepth,
    NormalBae,
    OpenPose,
    PidiNet,
    ZoeDepth,
)
from nodes.conditioning import ControlApply, TextEncode
from nodes.image import LoadImage, LoadMask, ResizePad, SaveImage
from nodes.inpaint_crop import InpaintCrop, InpaintPaste
from nodes.ip_adapter import CLIPVisionLoader, IPAdapterApply, IPAdapterLoader
from nodes.lora import LoraLoader
from nodes.mask import (
    ColorToMask,
    CropToMask,
    FeatherMask,
    GrowMask,
    ImageToMask,
    InvertMask,
    MaskBlend,
    PasteCrop,
    ThresholdMask,
)
from nodes.models import CheckpointLoader, ControlNetLoader, VAELoader
from nodes.preprocess import Canny, Depth
from nodes.primitives import Bool, Float, Int, JoinText, Math, SelectText, String
from nodes.sampling import EmptyLatent, Sampler, VAEDecode, VAEEncode
from nodes.upscale import ImageScale, LatentUpscale

NODES = (Int, Float, String, Bool, Math, JoinText, SelectText, LoadImage, LoadMask, SaveImage, ResizePad,
         MaskBlend, FeatherMask, GrowMask, InvertMask, Canny,
         CheckpointLoader, ControlNetLoader, VAELoader,
         TextEncode, ControlApply, EmptyLatent, Sampler, VAEEncode, VAEDecode,
         Depth, ImageToMask, ColorToMask, ThresholdMask, CropToMask, PasteCrop,
         InpaintCrop, InpaintPaste,
         HED, PidiNet, MLSD, OpenPose, Lineart, LineartAnime, NormalBae, MidasDepth, ZoeDepth, ContentShuffle,
         LineartStandard, LoraLoader, ImageScale, LatentUpscale, T2IAdapterLoader, T2IAdapterApply,
         CLIPVisionLoader, IPAdapterLoader, IPAdapterApply)
