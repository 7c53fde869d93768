"""MMCAF-Net: lung-lesion histology from a chest CT and a short clinical record, inside 3D Slicer.

This file stays thin: everything that can run without Qt (reading nodes, the worker-thread job,
writing outputs, the model catalog) lives in MMCAFNetLib, installed next to this module.
Nothing heavy is imported here at file scope, and nothing runs at import.
"""

import json
import logging
import os
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: Python packages the module needs beyond what Slicer ships (torch comes from the PyTorch extension).
PIP_REQUIREMENTS = {"pydicom": "pydicom>=2.4", "pandas": "pandas>=1.5"}
DEMO_MODEL_ID = "mmcafnet-lite-demo"
POLL_INTERVAL_MS = 100


#
# MMCAFNet
#


class MMCAFNet(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel and help."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MMCAF-Net Lung Lesion Classifier"
        self.parent.categories = ["Chest Imaging Platform", "Quantification"]
        self.parent.dependencies = []
        self.parent.contributors = ["MMCAFNet contributors"]
        self.parent.helpText = """
Classifies the histological subtype of a lung lesion (adenocarcinoma, small cell, large cell or
squamous cell carcinoma) from the chest CT and a short clinical record (sex, age, weight, TNM stage,
smoking), with MMCAF-Net: a 3D feature pyramid with attention over the CT, a KAN encoder over the
record, and multi-scale cross-attention fusion.
<br><br>
Place a point (or an ROI, or a segmentation) on the lesion, check the form, press <b>Apply</b>.
Results: a table of class probabilities, an attention heatmap over the CT, and the region that drove
the prediction as a labelmap and a segmentation, all under the CT's study.
<br><br>
<b>Research use only.</b> The bundled demo model is trained on synthetic phantoms and says nothing
about real patients.
<br><br>
Method: Yu et al., "MMCAF-Net: Multi-modal multi-scale cross-attention fusion network for lung
cancer classification", MICCAI 2025,
<a href="https://arxiv.org/abs/2508.04205">arXiv:2508.04205</a>.
Data: Li et al., "A Large-Scale CT and PET/CT Dataset for Lung Cancer Diagnosis (Lung-PET-CT-Dx)",
The Cancer Imaging Archive, 2020,
<a href="https://doi.org/10.7937/TCIA.2020.NNC2-0461">doi:10.7937/TCIA.2020.NNC2-0461</a>.
"""
        self.parent.acknowledgementText = """
Built on the MMCAF-Net method of Yu et al. (MICCAI 2025) and trained with the Lung-PET-CT-Dx
collection of Li et al. (TCIA, 2020, CC BY 4.0). Uses 3D Slicer, the SlicerPyTorch extension and PyTorch.
"""


#
# Parameter node
#


@parameterNodeWrapper
class MMCAFNetParameterNode:
    """GUI state, saved with the scene.

    inputVolume - the CT. lesion - point, ROI or segmentation on the lesion (optional).
    modelId - catalog id or user model file. device / heatmapMethod / heatmapThreshold - run options.
    clinicalRecord - the form's values as JSON (the form depends on the model's schema).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    lesion: Union[vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLSegmentationNode]
    modelId: str = DEMO_MODEL_ID
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    heatmapMethod: Annotated[str, Choice(["attention", "gradcam", "none"])] = "attention"
    heatmapThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    showOutputs: bool = True
    clinicalRecord: str = "{}"


#
# Widget
#


class MMCAFNetWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: inputs, clinical form, model, options, Apply/Cancel, progress and result."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._formWidgets = {}
        self._models = []
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MMCAFNet.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MMCAFNetLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollJob)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.prefillButton.connect("clicked(bool)", self.onPrefillFromDicom)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModelFromFile)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.ui.clearModelsFolderButton.connect("clicked(bool)", self.onClearModelsFolder)
        self.ui.progressBar.setVisible(False)
        self.ui.demoWarningLabel.setVisible(False)

        self.populateModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.cancelJob()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.cancelJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode: Optional[MMCAFNetParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._selectModel(self._parameterNode.modelId)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._job is not None:
            return
        ready = bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.text = "Apply"
        self.ui.applyButton.toolTip = "Classify the lesion" if ready else "Select the CT volume first"

    # -- models ---------------------------------------------------------------------------------
    def populateModels(self) -> None:
        """Fill the model selector from Resources/Models.json and the user models folder."""
        from MMCAFNetLib import model_catalog

        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        try:
            self._models = model_catalog.list_models(models_dir=self.logic.modelsFolder())
        except (OSError, ValueError) as exc:
            self._models = []
            slicer.util.errorDisplay(f"The model catalog cannot be read: {exc}")
        for entry in self._models:
            suffix = "  [download]" if entry.downloadable else ("  [user]" if entry.source == "user" else "")
            self.ui.modelSelector.addItem(entry.title + suffix, entry.file or entry.id)
        self.ui.modelSelector.blockSignals(False)

    def _selectModel(self, modelId: str) -> None:
        for index, entry in enumerate(self._models):
            if modelId in (entry.id, entry.file):
                self.ui.modelSelector.currentIndex = index
                break
        self.onModelSelected(self.ui.modelSelector.currentIndex)

    def currentModel(self):
        index = self.ui.modelSelector.currentIndex
        return self._models[index] if 0 <= index < len(self._models) else None

    def onModelSelected(self, index: int) -> None:
        entry = self.currentModel()
        if entry is None:
            return
        if self._parameterNode:
            self._parameterNode.modelId = entry.file if entry.source == "user" else entry.id
        self.ui.downloadModelButton.enabled = entry.downloadable
        self.ui.modelInfoLabel.text = f"{entry.description} Licence: {entry.licence}.".strip()
        self.ui.demoWarningLabel.setVisible(entry.demo)
        self.buildClinicalForm(entry)

    def onAddModelFromFile(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), "Add MMCAF-Net model", "", "MMCAF-Net checkpoint (*.pt *.pth *.zip)"
        )
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("The file could not be added as a model.", waitCursor=True):
            from MMCAFNetLib import model_catalog

            entry = model_catalog.add_model_from_file(path, self.logic.modelsFolder())
            self.populateModels()
            self._selectModel(entry.file)

    def onDownloadModel(self) -> None:
        entry = self.currentModel()
        if entry is None or not entry.downloadable:
            return
        if not slicer.util.confirmOkCancelDisplay(
            f"Download '{entry.title}' from {entry.url} into {self.logic.modelsFolder()}?\n"
            "The file is checked against the catalog's checksum before use."
        ):
            return
        with slicer.util.tryWithErrorDisplay("The model could not be downloaded.", waitCursor=True):
            from MMCAFNetLib import model_catalog

            model_catalog.download_model(entry, self.logic.modelsFolder())
            slicer.util.showStatusMessage(f"Downloaded {entry.title}", 3000)

    def onOpenModelsFolder(self) -> None:
        folder = self.logic.modelsFolder()
        os.makedirs(folder, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(folder))

    def onClearModelsFolder(self) -> None:
        folder = self.logic.modelsFolder()
        if not slicer.util.confirmYesNoDisplay(f"Delete every downloaded and added model in {folder}?"):
            return
        from MMCAFNetLib import model_catalog

        self.logic.clearCache()
        removed = model_catalog.clear_models_folder(folder)
        slicer.util.showStatusMessage(f"Removed {removed} file(s) from the models folder", 3000)
        self.populateModels()
        self._selectModel(DEMO_MODEL_ID)

    # -- clinical form ----------------------------------------------------------------------------
    def buildClinicalForm(self, entry) -> None:
        """One row per field of the model's own schema; every field can stay 'unknown' (imputed)."""
        layout = self.ui.clinicalFormWidget.layout()
        while layout.count():
            item = layout.takeAt(0)
            if item.widget():
                item.widget().deleteLater()
        self._formWidgets = {}
        try:
            from MMCAFNetLib import ehr, slicer_logic
        except ImportError:
            layout.addRow(qt.QLabel("The clinical form appears once the dependencies are installed (press Apply)."))
            return
        try:
            schema = slicer_logic.form_schema(entry)
        except (OSError, ValueError) as exc:  # an unreadable model file: Apply will report it too
            logging.warning(f"MMCAFNet: the model's clinical schema could not be read ({exc}); showing the default form")
            schema = ehr.default_schema()
        saved = self._savedRecord()
        for spec in slicer_logic.form_fields(schema):
            if spec.kind == "continuous":
                widget = qt.QDoubleSpinBox()
                step = 1.0 if spec.maximum - spec.minimum > 20 else 0.1
                widget.setRange(spec.minimum - step, spec.maximum)  # the bottom value reads "unknown"
                widget.setSingleStep(step)
                widget.setSpecialValueText("unknown")
                widget.setSuffix(f" {spec.unit}" if spec.unit else "")
                widget.value = float(saved[spec.name]) if saved.get(spec.name) is not None else widget.minimum
                widget.connect("valueChanged(double)", self._storeRecord)
            else:
                widget = qt.QComboBox()
                for value, label in spec.choices:
                    widget.addItem(label, value)
                current = saved.get(spec.name) or slicer_logic.UNKNOWN
                widget.setCurrentIndex(max(0, widget.findData(str(current))))
                widget.connect("currentIndexChanged(int)", self._storeRecord)
            widget.toolTip = spec.tooltip
            layout.addRow(spec.label + ":", widget)
            self._formWidgets[spec.name] = widget

    def _savedRecord(self) -> dict:
        try:
            return json.loads(self._parameterNode.clinicalRecord) if self._parameterNode else {}
        except ValueError:
            return {}

    def formRecord(self) -> dict:
        record = {}
        for name, widget in self._formWidgets.items():
            if isinstance(widget, qt.QDoubleSpinBox):
                record[name] = None if widget.value <= widget.minimum else float(widget.value)
            else:
                value = widget.currentData
                record[name] = None if value in (None, "unknown") else value
        return record

    def _storeRecord(self, *args) -> None:
        if self._parameterNode:
            self._parameterNode.clinicalRecord = json.dumps(self.formRecord())

    def onPrefillFromDicom(self) -> None:
        """Sex, age and weight from the CT's DICOM header, when it came from the DICOM database."""
        from MMCAFNetLib import scene

        node = self._parameterNode.inputVolume if self._parameterNode else None
        record = scene.record_from_dicom_database(node, getattr(slicer, "dicomDatabase", None))
        if not record:
            slicer.util.showStatusMessage("No DICOM header values found for this volume", 3000)
            return
        for name, value in record.items():
            widget = self._formWidgets.get(name)
            if isinstance(widget, qt.QDoubleSpinBox):
                widget.value = float(value)
            elif widget is not None:
                widget.setCurrentIndex(max(0, widget.findData(str(value))))
        self._storeRecord()

    # -- running ------------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self._job is not None:
            self.cancelJob()
            return
        if not self.logic.ensureDependencies():
            return
        if not self._formWidgets:
            self.buildClinicalForm(self.currentModel())
        with slicer.util.tryWithErrorDisplay("Classification could not start.", waitCursor=True):
            from MMCAFNetLib import model_catalog, slicer_logic

            entry = self.currentModel()
            if entry is None:
                raise ValueError("select a model first")
            modelPath = str(model_catalog.model_path(entry, self.logic.modelsFolder()))
            p = self._parameterNode
            options = slicer_logic.ClassificationOptions(
                model_path=modelPath, device=p.device, heatmap=p.heatmapMethod,
                threshold=float(p.heatmapThreshold), show=bool(p.showOutputs),
            )
            self._job = self.logic.start(p.inputVolume, self.formRecord(), p.lesion, options)
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the classification; the scene is left unchanged"
            self.ui.progressBar.value = 0
            self.ui.progressBar.setVisible(True)
            self.ui.resultLabel.text = "Classifying..."
            self._timer.start()

    def onPollJob(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        self.ui.progressBar.value = job.percent
        if not job.poll():
            return
        self._timer.stop()
        self._job = None
        self.ui.progressBar.setVisible(False)
        self._checkCanApply()
        for message in job.messages:
            slicer.util.warningDisplay(message, windowTitle="MMCAF-Net")
        if job.cancelled:
            self.ui.resultLabel.text = "Cancelled; the scene is unchanged."
        elif job.error is not None:
            self.ui.resultLabel.text = "Failed; the scene is unchanged."
            logging.error("MMCAF-Net classification failed", exc_info=job.error)
            slicer.util.errorDisplay(f"Classification failed: {job.error}")
        else:
            from MMCAFNetLib import slicer_logic

            self.ui.resultLabel.text = slicer_logic.result_summary(job.result) + f"  ({job.elapsed:.1f} s)"
            self.ui.demoWarningLabel.setVisible(bool(job.result.model.get("demo")))
            for warning in job.result.warnings:
                logging.warning(f"MMCAF-Net: {warning}")

    def cancelJob(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.ui.resultLabel.text = "Cancelling..."


#
# Logic
#


class MMCAFNetLogic(ScriptedLoadableModuleLogic):
    """Thin Slicer logic: parameter node, dependencies, models folder; the work is MMCAFNetLib's.

    From the Python console (batch)::

        logic = slicer.util.getModuleLogic("MMCAFNet")
        logic.classifyAllVolumes(record={"sex": "M", "age": 63})
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._classifier = None

    def getParameterNode(self):
        return MMCAFNetParameterNode(super().getParameterNode())

    @property
    def classifier(self):
        if self._classifier is None:
            from MMCAFNetLib.slicer_logic import ClassificationLogic

            self._classifier = ClassificationLogic()
        return self._classifier

    @staticmethod
    def modelsFolder() -> str:
        """User models live in Slicer's per-user settings area, where the user can open and clear them."""
        from MMCAFNetLib.model_catalog import MODELS_DIR_ENV

        if os.environ.get(MODELS_DIR_ENV):
            return os.environ[MODELS_DIR_ENV]
        base = os.path.dirname(slicer.app.slicerUserSettingsFilePath) if hasattr(slicer, "app") else os.path.expanduser("~")
        return os.path.join(base, "MMCAFNet", "models")

    # -- dependencies -------------------------------------------------------------------------------
    @staticmethod
    def missingDependencies() -> list:
        import importlib.util

        names = ["torch", *PIP_REQUIREMENTS]
        return [name for name in names if importlib.util.find_spec(name) is None]

    def ensureDependencies(self, ask: bool = True) -> bool:
        """Install what is missing, after asking: torch via the PyTorch extension, the rest with pip.

        Slicer's own numpy and SimpleITK are pinned with a constraints file so pip never replaces them.
        """
        missing = self.missingDependencies()
        if not missing:
            return True
        if ask and not slicer.util.confirmOkCancelDisplay(
            "MMCAF-Net needs these Python packages, which will be downloaded and installed now: "
            + ", ".join(missing) + ". This can take several minutes.",
            windowTitle="MMCAF-Net: install dependencies",
        ):
            return False
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay(
                    "The PyTorch extension is required. Install 'PyTorch' from the Extensions Manager, "
                    "restart Slicer, then press Apply again."
                )
                return False
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=">=2.1")
                if torch is None:
                    slicer.util.errorDisplay("PyTorch could not be installed; see the PyTorch module for details.")
                    return False
        pipMissing = [PIP_REQUIREMENTS[name] for name in missing if name in PIP_REQUIREMENTS]
        if pipMissing:
            constraints = self._writeConstraints()
            slicer.util.pip_install([*pipMissing, "--constraint", constraints])
        still = self.missingDependencies()
        if still:
            slicer.util.errorDisplay(f"These packages are still missing: {', '.join(still)}")
            return False
        return True

    @staticmethod
    def _writeConstraints() -> str:
        """A pip constraints file pinning the numpy and SimpleITK that Slicer ships."""
        import contextlib
        import importlib.metadata
        import tempfile

        lines = []
        for dist in ("numpy", "SimpleITK"):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                lines.append(f"{dist}=={importlib.metadata.version(dist)}")
        handle, path = tempfile.mkstemp(prefix="mmcafnet-constraints-", suffix=".txt")
        with os.fdopen(handle, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        return path

    # -- running ------------------------------------------------------------------------------------
    def start(self, volumeNode, record, lesionNode=None, options=None):
        """Start a classification on a worker thread; poll the returned job from the main thread."""
        return self.classifier.start(volumeNode, record, lesionNode, options)

    def classify(self, volumeNode, record=None, lesionNode=None, options=None):
        """Blocking classification of one CT (console, tests). Returns (Classification, output nodes)."""
        return self.classifier.classify(volumeNode, record or {}, lesionNode, options)

    def classifyAllVolumes(self, record=None, options=None, volumeNodes=None):
        """Batch: classify every CT in the scene (or ``volumeNodes``) with the same record."""
        return self.classifier.classify_volume_nodes(volumeNodes, record_for=lambda node: dict(record or {}), options=options)

    def clearCache(self) -> None:
        if self._classifier is not None:
            self._classifier.clear_cache()


#
# Test
#


class MMCAFNetTest(ScriptedLoadableModuleTest):
    """Self-test: a synthetic case, the bundled demo model, and checks on every output node."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DemoModelOnSyntheticCase()

    def test_DemoModelOnSyntheticCase(self):
        import numpy as np

        self.delayDisplay("Building a synthetic case")
        logic = MMCAFNetLogic()
        if not logic.ensureDependencies(ask=False):
            self.skipTest("dependencies could not be installed")
        from MMCAFNetLib import scene, slicer_logic
        from MMCAFNetLib.synthetic import make_case

        case = make_case("A", seed=7, size=64)
        ct = slicer.util.addVolumeFromArray(np.ascontiguousarray(case.volume.array), case.volume.ijk_to_ras, "Synthetic CT")
        before = slicer.util.arrayFromVolume(ct).copy()
        point = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Lesion")
        point.AddControlPoint(*case.lesion_center_ras)

        self.delayDisplay("Classifying with the demo model")
        options = slicer_logic.ClassificationOptions(device="cpu", heatmap="attention", threshold=0.5)
        result, outputs = logic.classify(ct, case.record, point, options)
        self.assertTrue(result.model.get("demo"))
        self.assertAlmostEqual(float(np.sum(result.probabilities)), 1.0, places=4)

        table = outputs.table.GetTable()
        self.assertEqual(table.GetNumberOfRows(), len(result.class_names))
        for node in (outputs.heatmap, outputs.labelmap):
            self.assertTrue(np.allclose(scene.node_ijk_to_ras(node), scene.node_ijk_to_ras(ct)))
            self.assertEqual(node.GetImageData().GetDimensions(), ct.GetImageData().GetDimensions())
        labels = np.unique(slicer.util.arrayFromVolume(outputs.labelmap))
        self.assertTrue(set(labels.tolist()) <= {0, result.label_value})
        segment = outputs.segmentation.GetSegmentation().GetNthSegment(0)
        self.assertEqual(segment.GetName(), result.predicted_label)
        self.assertTrue(np.array_equal(before, slicer.util.arrayFromVolume(ct)))

        count = slicer.mrmlScene.GetNumberOfNodes()
        logic.classify(ct, case.record, point, options)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("MMCAF-Net self-test passed")
